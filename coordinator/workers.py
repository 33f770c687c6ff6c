"""The coordinator's per-chunk work, in-process or sharded over processes.

Every slot-chunk of the parameter vector is independent: parsing its K
gradient ciphertexts, their sum, unmasking its refreshed m, V, r, its HE-Adam
step and switching the new state to the bottom level touch no other chunk.
:func:`step_chunks` does that work for a list of chunks; the federation calls
it directly (``coordinator-workers`` 0 or 1) or through :class:`ChunkPool`, which
cuts most of the chunk indices into one contiguous shard per process, sized by
each process's measured speed, and hands out the last fifth on demand to
whichever process is through its own shard (:class:`Claims`): the calling
process works on the first shard, spawned worker processes on the others (TenSEAL's
``n_threads`` does not speed up element-wise work, docs/design.md#tenseal-facts, and
sealapi's calls hold the GIL, so threads do not either: measured, 2 threads took
38 ms per chunk where one took 34).

Ciphertexts arrive here as the bytes the participants sent, so parsing — the
check that a chunk is a ciphertext of this context at the expected level and
scale — happens where the chunk is used. A chunk that fails it raises
:class:`BadChunks` naming the reply (or the refresh) it came from; nothing has
been changed then, and the caller drops that reply and calls again.

Keys: each worker loads the *evaluation* context once, through
:func:`protocol.keys.coordinator_backend`, which refuses a context holding a
secret key — a worker can never decrypt. Chunks travel between processes as
bytes, never as live TenSEAL objects, and not through the executor's pipe:
each chunk of a spawned worker's shard is a file in a RAM-backed spool
directory, loaded and saved by SEAL, and the worker gets only the names
(:mod:`coordinator.spool`; the pipe moved 60–130 MB/s here, a 1M-parameter
shard is ~190 MB in and ~110 MB out). The worker starts as soon as it has the
names and its masks, and steps each chunk once the caller has written its
files (:meth:`Claims.wait_ready`), instead of idling while all are written. If
the spool cannot be written, the worker stops where its files end, the caller
steps the rest of its chunks, and later chunks go through the pipe. New state
leaves a worker at the bottom level, where a chunk saves in well under a
millisecond.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.he_adam import OPTIMIZERS, ChunkState
from coordinator.spool import Spool, spill, unspill, write_file
from protocol import keys
from protocol.adam import AdamHyper, StateUnits
from protocol.backend import Backend, Ct
from protocol.errors import ConfigError, HedrlError
from protocol.memory import retain_freed_memory
from protocol.params import get_param_set

log = logging.getLogger("flwr.hedrl.coordinator")

#: a chunk as a live handle, as its serialisation, or as a file holding that
#: (a spawned worker's chunks: :mod:`coordinator.spool`)
Chunk = Ct | bytes | Path
#: (m, V, r) per chunk already masked for the next refresher, and the masks
#: (name-major, as :func:`masks_by_chunk` takes them)
Premasked = tuple[list[tuple[Chunk, Chunk, Chunk]], list[np.ndarray]]
#: stages of :func:`step_chunks` (``adam_s`` includes the switch to the bottom;
#: ``mask_s`` masks the new state for the next round's refresher)
STEP_STAGES = ("parse_s", "sum_s", "unmask_s", "adam_s", "mask_s")
_OUT_NAMES = ("theta", "m", "V", "r")
#: where :meth:`ChunkPool.step` spends its caller's wall time: writing the
#: spawned workers' chunks to the spool, its own shard, waiting for the last
#: worker after it, collecting the workers' results (reading the masked state,
#: loading the new θ and state)
POOL_STAGES = ("spill_s", "own_s", "wait_s", "collect_s")


@dataclass(frozen=True)
class Failure:
    """One input chunk that did not parse."""

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
    #: the new (m, V, r) plus the ``mask_next`` masks, per chunk, as bytes
    masked: list[tuple[Chunk, Chunk, Chunk]] | None = field(default=None)
    #: seconds spent per stage (:data:`STEP_STAGES`; summed over the processes
    #: when sharded, i.e. CPU seconds rather than wall time)
    timings: dict[str, float] = field(default_factory=dict)
    #: the chunk index of each result, in the order above
    chunks: list[int] = field(default_factory=list)


def masks_by_chunk(masks: Sequence[np.ndarray], n: int) -> list[list[np.ndarray]]:
    """Name-major masks (m's chunks, then V's, then r's) → per chunk [m, V, r]."""
    if len(masks) % n:
        raise ValueError(f"{len(masks)} masks for {n} chunks")
    names = len(masks) // n
    return [[masks[j * n + i] for j in range(names)] for i in range(n)]


def mask_state(
    be: Backend,
    mvr: Sequence[Ct],
    masks: Sequence[np.ndarray],
    units: StateUnits,
    into: Sequence[Path] | None = None,
) -> tuple[Chunk, Chunk, Chunk]:
    """One chunk's stored (m, V, r) at the bottom level plus its masks,
    serialised (they only go on the wire, to the refresher), or written to
    ``into``.

    Stored state holds ``data = StateUnits.out·value``; each mask is added in
    the same units, so the refresher decrypts out·(value + mask), and after its
    :meth:`~StateUnits.refresh_scale` the coordinator subtracts inp·mask.
    """
    veiled = [  # stored handles carry factor 1: the mask goes in as out·mask
        be.add_plain(be.to_bottom(c), f * mask)
        for c, mask, f in zip(mvr, masks, units.out, strict=True)
    ]
    if into is None:
        m, v, r = (be.dump(c) for c in veiled)
        return m, v, r
    for c, path in zip(veiled, into, strict=True):
        be.dump_file(c, path)
    m, v, r = into
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
    as_bytes: bool = False,
    out_dir: Path | None = None,
    keep_aggregate: bool = False,
    first_chunk: int = 0,
    mask_next: Sequence[Sequence[np.ndarray]] | None = None,
    chunk_ids: Sequence[int] | None = None,
    order: Iterable[int] | None = None,
    theta_as_bytes: bool = False,
) -> StepResult:
    """Sum, unmask and step every chunk.

    Input chunks may be handles, bytes or files; the new chunks come back as
    handles, as bytes (``as_bytes``) or as files in ``out_dir``.

    ``grads[j]`` lists chunk j of every accepted gradient in summation order
    (top level; given the participants' factor b_top^(−½) here); ``state[j]``
    is (m, V, r) at ``state_level`` (one level for all three, or one each:
    :meth:`StateUnits.levels`) in the step's input units
    (``StateUnits.inp``: what a refresher or the round-1 key holder sends),
    still masked when ``unmask[j]`` gives the masks to subtract. The new state
    comes back stored, ``data = StateUnits.out·value`` with factor 1 on the
    handle. With ``mask_next``, the new (m, V, r) of chunk j plus
    ``mask_next[j]`` come back too (``masked``, serialised): what the next
    round's refresher gets, masked where the chunk is, in parallel when
    sharded. Raises :class:`BadChunks` (listing every chunk that did not parse)
    before anything is returned.

    Position j is chunk ``chunk_ids[j]`` of the vector (default
    ``first_chunk + j``: named in errors and output files). ``order`` gives
    the positions to step, in that order, and may be lazy (a pool's process
    claiming shared chunks, :class:`ChunkPool`); by default every position.
    The result lists what was stepped in that order (``chunks``). With
    ``theta_as_bytes`` the new θ comes back serialised even when the state
    comes back as handles (θ only goes on the wire until the next step).
    """
    fn = OPTIMIZERS[optimizer]
    units = StateUnits.of(be, hp)
    levels = (state_level,) * 3 if isinstance(state_level, int) else state_level
    top = be.top_level
    clock = dict.fromkeys(STEP_STAGES, 0.0)
    now = time.perf_counter
    failures: list[Failure] = []
    theta_out: list[Chunk] = []
    state_out: list[tuple[Chunk, Chunk, Chunk]] = []
    aggregate: list[Ct] | None = [] if keep_aggregate else None
    masked: list[tuple[Chunk, Chunk, Chunk]] | None = None
    if mask_next is not None:
        masked = []
    ids = (
        range(first_chunk, first_chunk + len(theta)) if chunk_ids is None else chunk_ids
    )
    done: list[int] = []
    for j in range(len(theta)) if order is None else order:
        th, cid = theta[j], ids[j]
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
        if aggregate is not None:
            aggregate.append(x)
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
        handles = [be.to_bottom(new.theta)] + [
            _stored(be.to_bottom(c), f, name)
            for c, f, name in zip((new.m, new.V, new.r), units.out, "mVr", strict=True)
        ]
        out: list[Chunk]
        if out_dir is not None:
            out = [out_dir / f"{cid}.new-{n}" for n in _OUT_NAMES]
            for c, path in zip(handles, out, strict=True):
                be.dump_file(c, path)
        elif as_bytes:
            out = [be.dump(c) for c in handles]
        else:
            out = list(handles)
            if theta_as_bytes:
                out[0] = be.dump(handles[0])
        t4 = now()
        if masked is not None:
            assert mask_next is not None
            into = None
            if out_dir is not None:
                into = [out_dir / f"{cid}.masked-{n}" for n in "mVr"]
            masked.append(mask_state(be, handles[1:], mask_next[j], units, into))
        t5 = now()
        spans = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
        for stage, dt in zip(STEP_STAGES, spans, strict=True):
            clock[stage] += dt
        theta_out.append(out[0])
        state_out.append((out[1], out[2], out[3]))
        done.append(cid)
    if failures:
        raise BadChunks(failures)
    return StepResult(theta_out, state_out, aggregate, masked, clock, done)


def auto_workers(n_chunks: int, cores: int | None = None) -> int:
    """Processes (the coordinator's own included) for ``coordinator-workers = -1``.

    One per usable core, and more than that when it balances the load: the
    chunks' step is the unit of work, so 3 chunks on 2 processes take two steps
    of time while 3 processes sharing the 2 cores take 1.5. The smallest count
    whose makespan, max(⌈n/w⌉, n/cores) steps, is within 10% of the best is
    taken (extra processes cost memory and switching). No pool (0) on a single
    core or for a single chunk; at most 8, at most one per chunk.
    """
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
    top = min(n_chunks, 8)
    if cores < 2 or top < 2:
        return 0
    first = min(cores, top)

    def makespan(w: int) -> float:
        return max(-(-n_chunks // w), n_chunks / cores)

    best = min(makespan(w) for w in range(first, top + 1))
    return next(w for w in range(first, top + 1) if makespan(w) <= 1.1 * best)


# ---- chunks handed out on demand --------------------------------------------------
#: share of a sharded step's chunks that are not split in advance: each process,
#: once through its own shard, claims the next of them until none is left. The
#: static split follows the speeds measured in earlier steps, but two vCPUs here
#: change speed from round to round (a shard's time differed by up to 12 % from
#: the other's at 1M parameters, 2026-12-04); a fifth absorbs that.
SHARED_FRACTION = 0.2


def _shared_count(n: int, processes: int) -> int:
    """How many of ``n`` chunks are claimed on demand: about
    :data:`SHARED_FRACTION` of them, leaving each process one of its own."""
    if processes < 2:
        return 0
    return max(0, min(n - processes, round(SHARED_FRACTION * n)))


#: how long a worker waits for the caller to write its next chunk's files
READY_TIMEOUT_S = 600.0


class Claims:
    """What every process of a pool sees in shared memory: the next unclaimed
    shared chunk, and per spawned worker how many of its chunks' spool files
    the caller has written (−1 − that count once it has given up writing)."""

    def __init__(self, mp: Any, workers: int = 1) -> None:
        self._next = mp.RawValue("q", 0)
        self._lock = mp.Lock()
        self._ready = mp.RawArray("q", max(workers, 1))

    def set_ready(self, shard: int, n: int) -> None:
        """Shard ``shard``'s first ``n`` positions are written."""
        self._ready[shard] = n

    def give_up(self, shard: int, n: int) -> None:
        """Shard ``shard``'s first ``n`` positions are written, the rest never
        will be."""
        self._ready[shard] = -1 - n

    def wait_ready(self, shard: int, n: int, timeout: float = READY_TIMEOUT_S) -> bool:
        """Wait until the first ``n`` positions of ``shard`` are written: True, or
        False if the caller gave up writing (or did not get there in time)."""
        deadline = time.monotonic() + timeout
        while True:
            have = self._ready[shard]
            if have >= n:
                return True
            if have < 0:  # given up after −1 − have positions
                return n <= -1 - have
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)

    def reset(self, start: int) -> None:
        with self._lock:
            self._next.value = start

    def take(self, stop: int) -> int | None:
        """The next chunk below ``stop``, now this process's; None when none is left."""
        with self._lock:
            i = int(self._next.value)
            if i >= stop:
                return None
            self._next.value = i + 1
            return i


class Claimed:
    """A process's positions for :func:`step_chunks`: its ``fixed`` own chunks
    (positions 0 … fixed − 1), then the shared chunks (``shared``, at positions
    fixed, fixed + 1, …) it claims as it goes. Iterating again replays what was
    claimed before and goes on claiming (a retry of the same step).

    A spawned worker (``shard``) steps a position only once the caller has
    written its files (:meth:`Claims.wait_ready`), and claims shared chunks only
    once all its files are there; if the caller could not write them, it stops
    and the caller steps what is left."""

    def __init__(
        self,
        fixed: int,
        claims: Claims | None,
        shared: range,
        shard: int | None = None,
    ) -> None:
        self.fixed, self.claims, self.shared = fixed, claims, shared
        self.shard = shard
        self.taken: list[int] = []

    def _ready(self, n: int) -> bool:
        if self.shard is None or self.claims is None:
            return True
        return self.claims.wait_ready(self.shard, n)

    def __iter__(self) -> Iterator[int]:
        for j in range(self.fixed):
            if not self._ready(j + 1):
                return
            yield j
        base = self.fixed - self.shared.start
        for i in list(self.taken):
            yield base + i
        if self.claims is None or not self._ready(self.fixed + len(self.shared)):
            return
        while (i := self.claims.take(self.shared.stop)) is not None:
            self.taken.append(i)
            yield base + i


# ---- worker side ------------------------------------------------------------------
_worker_be: Backend | None = None
_worker_claims: Claims | None = None


def _init_worker(
    contexts: Any, param_set: str, backend: str, retain_memory: bool, claims: Claims
) -> None:
    global _worker_be, _worker_claims
    if retain_memory:
        retain_freed_memory()
    _worker_claims = claims
    context = contexts.get(timeout=600)
    _worker_be, _ = keys.coordinator_backend(context, get_param_set(param_set), backend)


def _be() -> Backend:
    assert _worker_be is not None, "worker used before its initializer ran"
    return _worker_be


def _step_shard(*args: Any, **kwargs: Any) -> StepResult | BadChunks:
    try:
        return step_chunks(_be(), *args, as_bytes=True, **kwargs)
    except BadChunks as exc:  # returned: every shard's failures are reported
        return exc


def _step_shard_spooled(
    src: Path,
    out_dir: Path,
    packed: Any,
    kwargs: dict[str, Any],
    shared: tuple[int, int, int] | None = None,
    shard: int | None = None,
) -> StepResult | BadChunks:
    """:func:`_step_shard` on chunks in files (:mod:`coordinator.spool`), the
    masks in ``src``; the new chunks go to files in ``out_dir`` (bytes, through
    the pipe, if they cannot be written there). With ``shared`` = (own chunks,
    first and end of the shared ones), the files hold the worker's own chunks
    followed by the shared ones, which it claims (:class:`Claimed`) once
    through its own. With ``shard``, the caller is still writing the files:
    each is used once :class:`Claims` says it is there."""
    args, mask_next = unspill(packed, src)
    if shared is not None:
        fixed, first, end = shared
        order = Claimed(fixed, _worker_claims, range(first, end), shard)
        kwargs = {**kwargs, "order": order}
    try:
        return step_chunks(_be(), *args, mask_next=mask_next, out_dir=out_dir, **kwargs)
    except BadChunks as exc:
        return exc
    except OSError:  # e.g. the directory's space ran out: in-band, from the start
        return _step_shard(*args, mask_next=mask_next, **kwargs)


def _noop(_: int) -> None:
    _be()


# ---- coordinator side -------------------------------------------------------------
def _shards(n: int, weights: Sequence[float]) -> list[slice]:
    """Contiguous slices of range(n), one per weight, sized in proportion to the
    weights (largest remainder), each at least one chunk while there are enough;
    empty ones dropped. Equal weights give near-equal slices."""
    parts = len(weights)
    if n <= parts:
        sizes = [1] * n + [0] * (parts - n)
    else:
        w = np.asarray(weights, dtype=float)
        share = (n - parts) * w / w.sum()  # one chunk each is reserved
        sizes = [1 + int(x) for x in np.floor(share)]
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        for i in order[: n - sum(sizes)]:
            sizes[i] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [
        slice(int(a), int(b))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        if b > a
    ]


def _rebalanced(
    weights: Sequence[float], sizes: Sequence[int], seconds: Sequence[float]
) -> list[float]:
    """Next step's weights: each process's chunks per second in this step
    (a spawned worker's seconds include moving its chunks), averaged half and
    half with the previous weights, normalised to mean 1."""
    speed = np.array([c / max(s, 1e-9) for c, s in zip(sizes, seconds, strict=True)])
    speed /= speed.mean()
    prev = np.asarray(weights, dtype=float)
    new = 0.5 * prev / prev.mean() + 0.5 * speed
    return [float(x) for x in new / new.mean()]


_MAIN_GUARD = (
    "coordinator worker processes (run-config coordinator-workers) start by "
    "importing the main module; a script that builds a Federation must do so "
    'under `if __name__ == "__main__":`, or set coordinator-workers=0'
)


class ChunkPool:
    """The coordinator's process plus a reusable pool holding the evaluation context.

    ``workers`` processes share each step's chunks: the calling process takes
    the first shard itself, in-process, while ``workers − 1`` spawned processes
    take the others. Its own shard costs no copying: only the other shards'
    ciphertexts cross a process boundary (as bytes, through spool files), which
    was ~20 % on top of a shard's work when every shard went to a spawned
    process through the pipe.

    Parameters
    ----------
    context : bytes
        The evaluation context (public + relinearisation keys). A context that
        holds a secret key is refused here and in every worker.
    param_set : str
        Parameter-set id, e.g. ``"8k-35x3"``.
    backend : str
        ``"ckks"`` or ``"plain"``.
    workers : int
        Processes sharing the work, the caller's included (≥ 1; 1 spawns none).
    """

    def __init__(
        self,
        *,
        context: bytes,
        param_set: str,
        backend: str,
        workers: int,
        retain_memory: bool = True,
    ) -> None:
        """``retain_memory``: the workers keep freed memory for reuse
        (:func:`protocol.memory.retain_freed_memory`, run-config
        ``retain-freed-memory``)."""
        if workers < 1:
            raise ConfigError(f"workers must be ≥ 1, received {workers}")
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # This is a worker being spawned: it imports the user's main module,
            # which builds a Federation again. Starting workers from here would
            # deadlock parent and child, and a mere exception leaves this process
            # hanging at exit; so say why and leave: the parent reports it.
            sys.stderr.write(f"hedrl: {_MAIN_GUARD}\n")
            sys.stderr.flush()
            os._exit(1)
        # fail here, in the caller's process, before any worker starts
        self.be, _ = keys.coordinator_backend(
            context, get_param_set(param_set), backend
        )
        self.workers = workers
        #: relative speed per process (the caller's first), from the last steps:
        #: how the next step's chunks are split
        self.weights = [1.0] * workers
        #: the last step's :data:`POOL_STAGES` (seconds, the caller's wall time)
        self.times = dict.fromkeys(POOL_STAGES, 0.0)
        #: chunks each process stepped in the last step (the caller's first)
        self.counts: list[int] = []
        self._pool: ProcessPoolExecutor | None = None
        self._spool: Spool | None = None
        #: which shared chunk is next (:class:`Claims`; only with spawned workers)
        self._claims: Claims | None = None
        #: spool files written in the current step (each once per step)
        self._written: set[Path] = set()
        #: a spool that failed in this step, kept until its workers are done
        self._retired: list[Spool] = []
        if workers == 1:
            return
        try:
            self._spool = Spool()
        except OSError as exc:
            log.warning(
                "coordinator workers: no spool directory (%s); chunks go "
                "through the pipe",
                exc,
            )
        # The context reaches the workers through a queue (one copy each, fed by
        # a background thread), not pickled into the spawn: spawn writes its data
        # into a pipe and blocks for good if that exceeds the pipe buffer and
        # the child dies before reading it all.
        mp = multiprocessing.get_context("spawn")
        self._contexts = mp.Queue()
        for _ in range(workers - 1):
            self._contexts.put(context)
        self._contexts.cancel_join_thread()  # a dead worker must not block exit
        self._claims = Claims(mp, workers)
        self._pool = ProcessPoolExecutor(
            max_workers=workers - 1,
            mp_context=mp,
            initializer=_init_worker,
            initargs=(self._contexts, param_set, backend, retain_memory, self._claims),
        )
        # start every worker now so the first round does not pay for it
        try:
            list(self._pool.map(_noop, range(workers - 1)))
        except BrokenProcessPool as exc:
            self.close()
            raise ConfigError(
                "coordinator workers did not start: a worker process died "
                "during start-up (its error is above). A common cause: " + _MAIN_GUARD
            ) from exc

    def __enter__(self) -> ChunkPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._contexts.close()
            self._pool = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._close_retired()

    def _close_retired(self) -> None:
        while self._retired:
            self._retired.pop().close()

    def _write(self, c: Chunk, path: Path) -> None:
        """One chunk in its own spool file (SEAL loads it from there); a shared
        chunk's file is written once per step, whichever worker needs it first."""
        if isinstance(c, Path) or path in self._written:
            return
        if isinstance(c, Ct):
            self.be.dump_file(c, path)
        else:
            write_file(path, c)
        self._written.add(path)

    def _give_up_spool(self, exc: OSError) -> None:
        assert self._spool is not None
        log.warning(
            "coordinator workers: cannot write to %s (%s); chunks go through "
            "the pipe from now on",
            self._spool.dir,
            exc,
        )
        # closed once this step's workers are done with the files written
        self._retired.append(self._spool)
        self._spool = None

    def _spill(
        self,
        shard: int,
        chunks: Sequence[int],
        args: tuple[Any, ...],
        mask_next: list[Sequence[np.ndarray]] | None,
    ) -> tuple[Path, Any, list[list[tuple[Chunk, Path]]]] | None:
        """A worker's chunks (``chunks``: their indices, as in ``args``) as
        spool files, one per chunk, named but not written yet, and its masks
        written into one more file: (that file, what to send, the files to
        write per position — :meth:`_write_files`), or None to send all
        in-band."""
        if self._spool is None:
            return None
        theta, state, level, unmask, grads, t, hp = args
        path = self._spool.path
        files: list[list[tuple[Chunk, Path]]] = []

        def name(c: Chunk, tag: str) -> Path:
            return c if isinstance(c, Path) else path(tag)

        theta_f, state_f, grads_f = [], [], []
        for i, th, st, gr in zip(chunks, theta, state, grads, strict=True):
            theta_f.append(name(th, f"{i}.theta"))
            state_f.append(
                tuple(
                    name(c, f"{i}.refresh-{n}") for n, c in zip("mVr", st, strict=True)
                )
            )
            grads_f.append([name(c, f"{i}.grad-{r}") for r, c in enumerate(gr)])
            pos = [theta_f[-1], *state_f[-1], *grads_f[-1]]
            files.append(list(zip([th, *st, *gr], pos, strict=True)))
        src = path(f"in-{shard}")
        tree = ((theta_f, state_f, level, unmask, grads_f, t, hp), mask_next)
        try:
            return src, spill(tree, src), files
        except OSError as exc:  # full or gone: the pipe still works
            self._give_up_spool(exc)
            return None

    def _write_files(self, shard: int, files: list[list[tuple[Chunk, Path]]]) -> int:
        """Write a submitted worker's files position by position, telling it as
        each is there; returns how many positions were written (fewer if the
        spool failed: the worker stops there)."""
        assert self._claims is not None
        for p, pos in enumerate(files):
            try:
                for c, path in pos:
                    self._write(c, path)
            except OSError as exc:
                self._claims.give_up(shard, p)
                self._give_up_spool(exc)
                return p
            self._claims.set_ready(shard, p + 1)
        return len(files)

    def _submit(
        self,
        shard: int,
        sl: slice,
        shared: range,
        track: tuple[list[Future[Any]], dict[Future[Any], float]],
        full: tuple[Any, ...],
        mask_next: Sequence[Sequence[np.ndarray]] | None,
        base: dict[str, Any],
    ) -> list[int]:
        """Start one spawned worker on its shard ``sl`` (and the shared chunks)
        of the step's arguments ``full``: through the spool, the worker starting
        at once while its files are written, or in-band. The future goes into
        ``track`` (futures, their done times). Returns its own chunks whose
        files could not be written (the caller steps them)."""
        assert self._pool is not None, "step on a closed pool"
        futures, done_at = track
        n_own = sl.stop - sl.start
        ids = [*range(sl.start, sl.stop), *shared]
        args = _pick(ids, full)
        nxt = None if mask_next is None else [mask_next[i] for i in ids]
        kwargs: dict[str, Any] = {**base, "chunk_ids": ids}
        planned = self._spill(shard, ids, args, nxt)
        if planned is None:  # in-band: its own chunks only
            ids = ids[:n_own]
            th, st, level, um, gr, t, hp = _pick(ids, full)
            args = (
                [self.be.to_bytes(c) for c in th],
                [tuple(self.be.to_bytes(c) for c in s) for s in st],
                level,
                um,
                [[self.be.to_bytes(c) for c in g] for g in gr],
                t,
                hp,
            )
            kwargs["chunk_ids"] = ids
            nxt = None if nxt is None else nxt[:n_own]
            fut = self._pool.submit(_step_shard, *args, mask_next=nxt, **kwargs)
            fut.add_done_callback(lambda f: done_at.setdefault(f, time.perf_counter()))
            futures.append(fut)
            return []
        src, packed, files = planned
        assert self._claims is not None and self._spool is not None
        self._claims.set_ready(shard, 0)
        fut = self._pool.submit(
            _step_shard_spooled,
            src,
            self._spool.dir,
            packed,
            kwargs,
            (n_own, shared.start, shared.stop),
            shard,
        )
        fut.add_done_callback(lambda f: done_at.setdefault(f, time.perf_counter()))
        futures.append(fut)
        written = self._write_files(shard, files)
        return ids[written:n_own]

    @staticmethod
    def _read_masked(res: StepResult | BadChunks) -> StepResult | BadChunks:
        """The masked state only goes on the wire: as bytes."""
        if isinstance(res, StepResult) and res.masked is not None:
            res.masked = [
                tuple(c.read_bytes() if isinstance(c, Path) else c for c in s)  # type: ignore[misc]
                for s in res.masked
            ]
        return res

    def step(
        self,
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
        mask_next: Sequence[Sequence[np.ndarray]] | None = None,
    ) -> StepResult:
        """:func:`step_chunks` sharded over the workers; the new state as
        handles, θ and the masked state (which only go on the wire until the
        next step) as bytes.

        The first shard runs here while the spawned workers run the others;
        the last :data:`SHARED_FRACTION` of the chunks go to whichever process
        is free first (:class:`Claims`), so a process that runs slower in this
        step than in the last ones does not hold the others up.
        """
        n = len(theta)
        if len(state) != n or len(grads) != n:
            raise ValueError(
                f"{n} θ chunks, {len(state)} state chunks, {len(grads)} gradient "
                "chunks: expected equal counts"
            )
        now = time.perf_counter
        start = now()
        # the last chunks are claimed on demand (only by workers reading the
        # spool; in-band ones get their own chunks only), the rest split by speed
        shared_n = _shared_count(n, self.workers) if self._spool is not None else 0
        shared = range(n - shared_n, n)
        shards = _shards(n - shared_n, self.weights)
        own, *others = shards
        if self._claims is not None:
            self._claims.reset(shared.start)
        self._written = set()
        self._close_retired()  # a step that ended in BadChunks left it
        full = (theta, state, state_level, unmask, grads, t, hp)
        base = {"optimizer": optimizer, "k": k}
        futures: list[Future[Any]] = []
        done_at: dict[Future[Any], float] = {}
        # own chunks of workers whose files could not all be written: stepped here
        leftover: list[int] = []
        try:
            for shard, sl in enumerate(others, start=1):
                leftover += self._submit(
                    shard, sl, shared, (futures, done_at), full, mask_next, base
                )
        except BaseException:
            if self._claims is not None:  # the workers stop where they are
                for shard in range(1, len(others) + 1):
                    self._claims.give_up(shard, 0)
            wait(futures)
            raise
        t_own = now()
        try:
            ids = [*range(own.start, own.stop), *leftover, *shared]
            mine: StepResult | BadChunks = step_chunks(
                self.be,
                *_pick(ids, full),
                optimizer=optimizer,
                k=k,
                chunk_ids=ids,
                order=Claimed(len(ids) - len(shared), self._claims, shared),
                theta_as_bytes=True,
                mask_next=None if mask_next is None else [mask_next[i] for i in ids],
            )
        except BadChunks as exc:  # the other shards' failures are reported too
            mine = exc
        finally:
            t_wait = now()
            seconds = [t_wait - start]
            wait(futures)  # never leave a shard running into the next step
        t_collect = now()
        results: list[StepResult | BadChunks] = [mine]
        for f in futures:
            t_read = now()
            results.append(self._read_masked(f.result()))
            # a worker's time: until its reply arrived, plus reading its chunks
            seconds.append(done_at[f] - start + now() - t_read)
        failures = [f for r in results if isinstance(r, BadChunks) for f in r.failures]
        if failures:
            raise BadChunks(failures)
        done = [r.chunks for r in results if isinstance(r, StepResult)]
        if sorted(i for c in done for i in c) != list(range(n)):
            raise RuntimeError(f"pool step: chunks stepped {done}, expected 0…{n - 1}")
        self.counts = [len(c) for c in done]
        if len(shards) == self.workers and n > self.workers:
            self.weights = _rebalanced(self.weights, self.counts, seconds)
        be = self.be
        out = StepResult([], [], timings=dict.fromkeys(STEP_STAGES, 0.0))
        theta_new: list[bytes | None] = [None] * n
        state_new: list[tuple[Ct, Ct, Ct] | None] = [None] * n
        masked_new: list[tuple[Chunk, Chunk, Chunk] | None] = [None] * n
        for r in results:
            assert isinstance(r, StepResult)
            for stage, dt in r.timings.items():
                out.timings[stage] += dt
            for j, i in enumerate(r.chunks):
                th = r.theta[j]
                theta_new[i] = (
                    th.read_bytes() if isinstance(th, Path) else be.to_bytes(th)
                )
                state_new[i] = tuple(_handle(be, c, 0) for c in r.state[j])  # type: ignore[assignment]
                if r.masked is not None:
                    masked_new[i] = r.masked[j]
        out.theta = theta_new  # type: ignore[assignment]
        out.state = state_new  # type: ignore[assignment]
        out.chunks = list(range(n))
        if mask_next is not None:
            out.masked = masked_new  # type: ignore[assignment]
        self._close_retired()
        spans = (t_own - start, t_wait - t_own, t_collect - t_wait, now() - t_collect)
        self.times = dict(zip(POOL_STAGES, spans, strict=True))
        return out


def _pick(ids: Sequence[int], full: tuple[Any, ...]) -> tuple[Any, ...]:
    """:func:`step_chunks`'s positional arguments ``full`` (θ, state, state
    level, unmask, gradients, t, hp) for the chunks ``ids`` only."""
    theta, state, state_level, unmask, grads, t, hp = full
    return (
        [theta[i] for i in ids],
        [state[i] for i in ids],
        state_level,
        None if unmask is None else [unmask[i] for i in ids],
        [grads[i] for i in ids],
        t,
        hp,
    )
