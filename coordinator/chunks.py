"""The coordinator's per-chunk work: parse, sum, unmask, HE-Adam, mask.

Every slot-chunk of the parameter vector is independent: parsing its K
gradient ciphertexts, their sum, unmasking its refreshed m, V, r, its HE-Adam
step, switching the new state to the bottom level and masking it for the next
round's refresher touch no other chunk. :func:`step_chunks` does that work for
a list of chunks, in the caller's process (the federation with
``coordinator-workers`` 0 or 1) or in the worker processes of
:class:`coordinator.workers.ChunkPool`, one contiguous shard each.

Ciphertexts arrive here as the bytes the participants sent (or as files
holding them, in a worker), so parsing — the check that a chunk is a
ciphertext of this context at the expected level and scale — happens where the
chunk is used. A chunk that fails it, or whose use raises anything, raises
:class:`BadChunks` naming the reply (or the refresh) it came from; nothing has
been changed then, and the caller drops that reply and calls again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.he_adam import OPTIMIZERS, ChunkState
from protocol.adam import AdamHyper, StateUnits
from protocol.backend import Backend, Ct
from protocol.errors import HedrlError

#: a chunk as a live handle, as its serialisation, or as a file holding that
#: (a pool worker's inputs)
Chunk = Ct | bytes | Path
#: (m, V, r) per chunk already masked for the next refresher, and the masks
#: (name-major, as :func:`masks_by_chunk` takes them)
Premasked = tuple[list[tuple[Chunk, Chunk, Chunk]], list[np.ndarray]]
#: stages of :func:`step_chunks` (``adam_s`` includes the switch to the bottom;
#: ``mask_s`` masks the new state for the next round's refresher)
STEP_STAGES = ("parse_s", "sum_s", "unmask_s", "adam_s", "mask_s")


@dataclass(frozen=True)
class Failure:
    """One input chunk that could not be used."""

    source: str  # "gradient" or "refresh"
    index: int  # position of the reply in the gradient list (0 for the refresh)
    chunk: int
    error: str  # "<ErrorType>: message"


class BadChunks(HedrlError):
    """Some input chunks are not valid ciphertexts; nothing was stepped."""

    def __init__(self, failures: list[Failure]) -> None:
        self.failures = failures
        first = failures[0]
        super().__init__(
            f"{len(failures)} unusable chunk(s), first: {first.source} "
            f"{first.index} chunk {first.chunk}: {first.error}"
        )

    def __reduce__(self) -> tuple[type, tuple[list[Failure]]]:
        return (BadChunks, (self.failures,))  # crosses the worker boundary intact


@dataclass
class StepResult:
    """New θ and (m, V, r) per chunk, all at the bottom level."""

    theta: list[Chunk]
    state: list[tuple[Chunk, Chunk, Chunk]]
    aggregate: list[Ct] | None = field(default=None)
    #: the new (m, V, r) plus the ``mask_next`` masks, per chunk
    masked: list[tuple[Chunk, Chunk, Chunk]] | None = field(default=None)
    #: seconds spent per stage (:data:`STEP_STAGES`; summed over the processes
    #: when sharded, i.e. CPU seconds rather than wall time)
    timings: dict[str, float] = field(default_factory=dict)


def masks_by_chunk(masks: Sequence[np.ndarray], n: int) -> list[list[np.ndarray]]:
    """Name-major masks (m's chunks, then V's, then r's) → per chunk [m, V, r]."""
    if len(masks) % n:
        raise ValueError(f"{len(masks)} masks for {n} chunks")
    names = len(masks) // n
    return [[masks[j * n + i] for j in range(names)] for i in range(n)]


def mask_state(
    be: Backend, mvr: Sequence[Ct], masks: Sequence[np.ndarray], units: StateUnits
) -> tuple[Ct, Ct, Ct]:
    """One chunk's stored (m, V, r) at the bottom level plus its masks (what
    the refresher gets).

    Stored state holds ``data = StateUnits.out·value``; each mask is added in
    the same units, so the refresher decrypts out·(value + mask), and after its
    :meth:`~StateUnits.refresh_scale` the coordinator subtracts inp·mask.
    """
    m, v, r = (  # stored handles carry factor 1: the mask goes in as out·mask
        be.add_plain(be.to_bottom(c), f * mask)
        for c, mask, f in zip(mvr, masks, units.out, strict=True)
    )
    return m, v, r


def _stored(c: Ct, factor: float, name: str) -> Ct:
    """A step's new state ``name`` as stored (factor 1 on the handle)."""
    if abs(c.factor / factor - 1.0) > 1e-9:  # the circuit and StateUnits disagree
        raise RuntimeError(f"new {name} carries factor {c.factor!r}, not {factor!r}")
    return Ct(c.data, c.level)


def _handle(be: Backend, c: Chunk, level: int) -> Ct:
    if isinstance(c, Ct):
        return c
    if isinstance(c, Path):
        return be.load_file(c, level=level)
    return be.load(c, level=level)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _sum(
    be: Backend, xs: Sequence[Ct], own: Ct, cid: int, failures: list[Failure]
) -> Ct | None:
    """Σ ``xs`` in order, or None with a :class:`Failure` for each reply whose
    chunk made an addition raise.

    Every chunk has passed :meth:`Backend.load`'s checks, after which no two
    chunks differ in anything an addition checks (parms_id, NTT form, scale,
    size). An addition that raises anyway is charged to the chunks so far that
    do not add to ``own``, a chunk the coordinator made itself (θ), or, if all
    do, to the chunk being added.
    """
    x = xs[0]
    for i, y in enumerate(xs[1:], start=1):
        try:
            x = be.add(x, y)
        except Exception as exc:
            odd = [k for k in range(i + 1) if not _adds(be, own, xs[k])]
            for k in odd or [i]:
                failures.append(Failure("gradient", k, cid, _why(exc)))
            return None
    return x


def _adds(be: Backend, a: Ct, b: Ct) -> bool:
    """Whether ``a + b`` can be computed."""
    try:
        be.add(a, b)
    except Exception:  # the caller charges the chunk that failed
        return False
    return True


def step_chunks(
    be: Backend,
    theta: Sequence[Chunk],
    state: Sequence[tuple[Chunk, Chunk, Chunk]],
    state_level: int | Sequence[int],
    unmask: Sequence[Sequence[np.ndarray]] | None,
    grads: Sequence[Sequence[Chunk]],
    t: int,
    hp: AdamHyper,
    *,
    optimizer: str = "he-adam",
    k: float = 1.0,
    keep_aggregate: bool = False,
    mask_next: Sequence[Sequence[np.ndarray]] | None = None,
    first_chunk: int = 0,
) -> StepResult:
    """Sum, unmask and step every chunk; the new chunks come back as handles.

    Input chunks may be handles, bytes or files. ``grads[j]`` lists chunk j of
    every accepted gradient in summation order (top level; given the
    participants' factor b_top^(−½) here); ``state[j]`` is (m, V, r) at
    ``state_level`` (one level for all three, or one each:
    :meth:`StateUnits.levels`) in the step's input units (``StateUnits.inp``:
    what a refresher or the round-1 key holder sends), still masked when
    ``unmask[j]`` gives the masks to subtract. The new state comes back
    stored, ``data = StateUnits.out·value`` with factor 1 on the handle. With
    ``mask_next``, the new (m, V, r) of chunk j plus ``mask_next[j]`` come back
    too (``masked``): what the next round's refresher gets. Position j is chunk
    ``first_chunk + j`` of the vector (named in errors). Raises
    :class:`BadChunks` (listing every chunk that could not be used) before
    anything is returned.
    """
    fn = OPTIMIZERS[optimizer]
    units = StateUnits.of(be, hp)
    levels = (state_level,) * 3 if isinstance(state_level, int) else state_level
    top = be.top_level
    clock = dict.fromkeys(STEP_STAGES, 0.0)
    now = time.perf_counter
    failures: list[Failure] = []
    out = StepResult([], [], [] if keep_aggregate else None, None, clock)
    masked: list[tuple[Chunk, Chunk, Chunk]] = []
    for j, th in enumerate(theta):
        cid = first_chunk + j
        t0 = now()
        xs = []
        for i, g in enumerate(grads[j]):
            try:
                xs.append(_handle(be, g, top))
            except Exception as exc:  # whatever a reply's chunk raises names it
                failures.append(Failure("gradient", i, cid, _why(exc)))
        try:
            mvr = [
                Ct(_handle(be, c, lvl).data, lvl, f)
                for c, f, lvl in zip(state[j], units.inp, levels, strict=True)
            ]
        except Exception as exc:
            failures.append(Failure("refresh", 0, cid, _why(exc)))
        if failures:
            continue  # keep parsing: report every bad chunk at once
        theta_j = _handle(be, th, 0)
        t1 = now()
        x = _sum(be, xs, theta_j, cid, failures)
        if x is None:
            continue
        x = Ct(x.data, x.level, be.gradient_factor)  # what participants multiplied by
        if out.aggregate is not None:
            out.aggregate.append(x)
        t2 = now()
        if unmask is not None:
            try:
                mvr = [
                    be.add_plain(c, -mask)
                    for c, mask in zip(mvr, unmask[j], strict=True)
                ]
            except Exception as exc:
                failures.append(Failure("refresh", 0, cid, _why(exc)))
                continue
        t3 = now()
        new = fn(be, ChunkState(theta_j, *mvr), x, t, hp, k)
        m, v, r = (
            _stored(be.to_bottom(c), f, name)
            for c, f, name in zip((new.m, new.V, new.r), units.out, "mVr", strict=True)
        )
        out.theta.append(be.to_bottom(new.theta))
        out.state.append((m, v, r))
        t4 = now()
        if mask_next is not None:
            masked.append(mask_state(be, (m, v, r), mask_next[j], units))
        t5 = now()
        for stage, dt in zip(
            STEP_STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True
        ):
            clock[stage] += dt
    if failures:
        raise BadChunks(failures)
    if mask_next is not None:
        out.masked = masked
    return out
