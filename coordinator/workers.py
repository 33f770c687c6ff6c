"""Shard the coordinator's per-chunk work across worker processes.

TenSEAL's ``n_threads`` does not speed up element-wise work (ARCHITECTURE §5),
but every slot-chunk of the parameter vector is independent: its sum of K
gradients, its unmasking, its HE-Adam step and its masking for the next
refresher touch no other chunk. :class:`ChunkPool` cuts the chunk indices into
one contiguous shard per worker process and runs each shard there.

Keys: each worker loads the *evaluation* context once, through
:func:`protocol.keys.coordinator_backend`, which refuses a context holding a
secret key — a worker can never decrypt. Chunks travel between processes as
their serialised bytes (:class:`WireCt`: bytes, level, known factor), never as
live TenSEAL objects. The pool is created once and reused every round; close it
(or use it as a context manager) when the run ends.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.he_adam import OPTIMIZERS, ChunkState
from protocol import keys
from protocol.adam import AdamHyper
from protocol.backend import Backend, Ct
from protocol.errors import ConfigError
from protocol.params import get_param_set


@dataclass(frozen=True)
class WireCt:
    """One chunk in transit: its serialisation, level and known factor."""

    data: bytes
    level: int
    factor: float = 1.0


def to_wire(be: Backend, c: Ct) -> WireCt:
    """Serialise a handle, carrying its factor beside the bytes."""
    return WireCt(be.dump(Ct(c.data, c.level)), c.level, c.factor)


def from_wire(be: Backend, w: WireCt) -> Ct:
    """Parse a chunk (checks its level, scale and size) and restore its factor."""
    c = be.load(w.data, level=w.level)
    c.factor = w.factor
    return c


# ---- worker side ------------------------------------------------------------------
_worker_be: Backend | None = None


def _init_worker(context: bytes, param_set: str, backend: str) -> None:
    global _worker_be
    _worker_be, _ = keys.coordinator_backend(context, get_param_set(param_set), backend)


def _be() -> Backend:
    assert _worker_be is not None, "worker used before its initializer ran"
    return _worker_be


def _mask_shard(
    state: list[tuple[WireCt, WireCt, WireCt]], masks: list[list[np.ndarray]]
) -> list[list[bytes]]:
    """Per chunk: each of m, V, r switched to the bottom level plus its mask."""
    be = _be()
    return [
        [
            be.dump(be.add_plain(be.to_bottom(from_wire(be, w)), mask))
            for w, mask in zip(chunk, chunk_masks, strict=True)
        ]
        for chunk, chunk_masks in zip(state, masks, strict=True)
    ]


def _step_shard(
    theta: list[WireCt],
    state: list[tuple[WireCt, WireCt, WireCt]],
    unmask: list[list[np.ndarray] | None],
    grads: list[list[WireCt]],
    t: int,
    hp: AdamHyper,
    optimizer: str,
    k: float,
) -> list[tuple[WireCt, ...]]:
    """Per chunk: sum the gradients (given order), unmask, step; (θ', m', V', r')."""
    be = _be()
    fn = OPTIMIZERS[optimizer]
    out = []
    for j, th in enumerate(theta):
        xs = [from_wire(be, g) for g in grads[j]]
        x = xs[0]
        for y in xs[1:]:
            x = be.add(x, y)
        m, v, r = (from_wire(be, w) for w in state[j])
        if unmask[j] is not None:
            m, v, r = (
                be.add_plain(c, -mask)
                for c, mask in zip((m, v, r), unmask[j], strict=True)
            )
        new = fn(be, ChunkState(from_wire(be, th), m, v, r), x, t, hp, k)
        out.append(tuple(to_wire(be, c) for c in (new.theta, new.m, new.V, new.r)))
    return out


# ---- coordinator side -------------------------------------------------------------
def _shards(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous, near-equal slices of range(n) (empty ones dropped)."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


class ChunkPool:
    """A reusable pool of processes holding the evaluation context.

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
        Number of worker processes (≥ 1).
    """

    def __init__(
        self, *, context: bytes, param_set: str, backend: str, workers: int
    ) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be ≥ 1, received {workers}")
        # fail here, in the caller's process, before any worker starts
        self.be, _ = keys.coordinator_backend(
            context, get_param_set(param_set), backend
        )
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(context, param_set, backend),
        )
        # start every worker now so the first round does not pay for it
        list(self._pool.map(_noop, range(workers)))

    def __enter__(self) -> ChunkPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, fn: Any, n: int, *per_chunk: Sequence[Any], **fixed: Any) -> list:
        futures = [
            self._pool.submit(fn, *(seq[sl] for seq in per_chunk), **fixed)
            for sl in _shards(n, self.workers)
        ]
        out: list = []
        for f in futures:
            out.extend(f.result())
        return out

    def mask(
        self,
        state: Sequence[tuple[WireCt, WireCt, WireCt]],
        masks: Sequence[Sequence[np.ndarray]],
    ) -> list[list[bytes]]:
        """Bytes of (m, V, r) per chunk at the bottom level, each plus its mask."""
        return self._run(_mask_shard, len(state), list(state), list(masks))

    def step(
        self,
        theta: Sequence[WireCt],
        state: Sequence[tuple[WireCt, WireCt, WireCt]],
        grads: Sequence[Sequence[WireCt]],
        t: int,
        hp: AdamHyper,
        *,
        unmask: Sequence[Sequence[np.ndarray]] | None = None,
        optimizer: str = "he-adam",
        k: float = 1.0,
    ) -> list[tuple[WireCt, ...]]:
        """Sum, (unmask,) and step every chunk; return (θ', m', V', r') per chunk.

        ``grads[j]`` lists chunk j of every accepted gradient in summation order;
        ``unmask[j]`` the masks to subtract from chunk j of (m, V, r).
        """
        n = len(theta)
        if len(state) != n or len(grads) != n:
            raise ValueError(
                f"{n} θ chunks, {len(state)} state chunks, {len(grads)} gradient "
                "chunks: expected equal counts"
            )
        return self._run(
            _step_shard,
            n,
            list(theta),
            list(state),
            list(unmask) if unmask is not None else [None] * n,
            list(grads),
            t=t,
            hp=hp,
            optimizer=optimizer,
            k=k,
        )

    def step_cts(
        self,
        state: Sequence[ChunkState],
        xs: Sequence[Ct],
        t: int,
        hp: AdamHyper,
        optimizer: str = "he-adam",
        k: float = 1.0,
    ) -> list[ChunkState]:
        """Drop-in for :func:`coordinator.he_adam.step` on live handles."""
        be = self.be
        out = self.step(
            [to_wire(be, s.theta) for s in state],
            [tuple(to_wire(be, c) for c in (s.m, s.V, s.r)) for s in state],
            [[to_wire(be, x)] for x in xs],
            t,
            hp,
            optimizer=optimizer,
            k=k,
        )
        return [ChunkState(*(from_wire(be, w) for w in chunk)) for chunk in out]


def _noop(_: int) -> None:
    _be()
