"""The coordinator's worker pool: :func:`step_chunks` over equal contiguous shards.

The calling process steps the first shard, spawned workers one each of the
others (sealapi's calls hold the GIL; TenSEAL's threads cover a batched tensor's
products, not parsing, checks or masks). Their chunks go through files in RAM,
all written before the shards are handed out (SEAL loads and saves by path;
the executor's pipe moved 60–130 MB/s). Workers load the evaluation context
through :func:`protocol.keys.coordinator_backend`, which refuses a secret key.
Bad chunks of every shard are reported together (:class:`BadChunks` names each
one's reply); a dead worker fails the step (:class:`PoolFailed`, which the
round survives) and the next step starts new workers.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.chunks import (  # noqa: F401 (re-exported for the federation)
    STEP_STAGES,
    BadChunks,
    Chunk,
    Premasked,
    StepResult,
    mask_state,
    masks_by_chunk,
    step_chunks,
)
from protocol import keys
from protocol.adam import AdamHyper
from protocol.backend import Backend
from protocol.errors import ConfigError, HedrlError
from protocol.memory import retain_freed_memory
from protocol.params import get_param_set

SHM = Path("/dev/shm")
_MAIN_GUARD = (
    "coordinator worker processes (run-config coordinator-workers) start by "
    "importing the main module; a script that builds a Federation must do so "
    'under `if __name__ == "__main__":`, or set coordinator-workers=0'
)


class PoolFailed(HedrlError):
    """A worker died or the spool failed: nothing was stepped."""


def auto_workers(n_chunks: int, cores: int | None = None) -> int:
    """Processes (the coordinator's own included) for ``coordinator-workers = -1``.

    One per core, or more if it balances the chunks better (3 chunks on 2 cores:
    3): the fewest whose makespan, max(⌈n/w⌉, n/cores), is within 10% of the
    best; none (0) on one core or for one chunk; at most 8 and one per chunk."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
    top = min(n_chunks, 8)
    if cores < 2 or top < 2:
        return 0
    counts = range(min(cores, top), top + 1)
    span = {w: max(-(-n_chunks // w), n_chunks / cores) for w in counts}
    return next(w for w in counts if span[w] <= 1.1 * min(span.values()))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (where there is no /proc: assumed)."""
    return not Path("/proc").is_dir() or Path(f"/proc/{pid}").exists()


def spool_dir(base: Path | None = None) -> Path:
    """A new private directory (mode 0700) in RAM (else the temporary directory),
    after removing this host's whose coordinator is gone (killed before it could
    close its pool; the host is in the name: /dev/shm may be shared)."""
    if base is None:
        usable = SHM.is_dir() and os.access(SHM, os.W_OK | os.X_OK)
        base = SHM if usable else Path(tempfile.gettempdir())
    host = "".join(ch if ch.isalnum() else "_" for ch in socket.gethostname())
    mine = f"hedrl-pool-{host}-"
    for d in base.glob(mine + "*"):
        pid = d.name[len(mine) :].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{mine}{os.getpid()}-", dir=base))


def write_shard(be: Backend, d: Path, sl: slice, args: tuple[Any, ...]) -> list[Any]:
    """Chunks ``sl`` of :func:`step_chunks`'s ``args`` and ``mask_next`` as files
    in ``d`` (masks in ``.npy`` files): the same arguments, files in their place."""
    theta, state, level, unmask, grads, t, hp, mask_next = args

    def put(c: Chunk, name: str) -> Path:
        (d / name).write_bytes(c if isinstance(c, bytes) else be.to_bytes(c))  # type: ignore[arg-type]
        return d / name

    def save(masks: Any, name: str) -> Path | None:
        if masks is None:
            return None
        np.save(d / f"{name}-{sl.start}.npy", np.asarray(masks[sl], dtype=np.float64))
        return d / f"{name}-{sl.start}.npy"

    files = [[], [], level, save(unmask, "unmask"), [], t, hp, save(mask_next, "next")]
    for i in range(sl.start, sl.stop):
        files[0].append(put(theta[i], f"{i}.theta"))
        files[1].append(
            [put(c, f"{i}.refresh-{x}") for c, x in zip(state[i], "mVr", strict=True)]
        )
        files[4].append([put(g, f"{i}.grad-{r}") for r, g in enumerate(grads[i])])
    return files


_worker_be: Backend | None = None


def _init_worker(context: str, param_set: str, backend: str, retain: bool) -> None:
    global _worker_be
    if retain:
        retain_freed_memory()
    data = Path(context).read_bytes()
    _worker_be, _ = keys.coordinator_backend(data, get_param_set(param_set), backend)


def _step_shard(files: list[Any], kw: dict) -> dict[str, float]:
    """A worker's shard from :func:`write_shard`'s files; the new chunks go
    beside them (``<chunk>.new-theta`` …). Returns the stages' seconds."""
    *args, nxt = (np.load(f) if isinstance(f, Path) else f for f in files)
    assert _worker_be is not None, "worker used before its initializer ran"
    res = step_chunks(_worker_be, *args, mask_next=nxt, **kw)
    for j, th in enumerate(args[0]):
        out = [("new-theta", res.theta[j])]
        out += zip(("new-m", "new-V", "new-r"), res.state[j], strict=True)
        if res.masked is not None:
            out += zip(("masked-m", "masked-V", "masked-r"), res.masked[j], strict=True)
        for name, c in out:
            _worker_be.dump_file(c, th.with_suffix(f".{name}"))  # type: ignore[arg-type]
    return res.timings


def _shards(n: int, parts: int) -> list[slice]:
    """Contiguous slices of range(n), sizes differing by at most one (the smaller
    first: the caller also writes and collects), empty ones dropped."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


class ChunkPool:
    """The coordinator's process plus ``workers − 1`` (≥ 0) spawned ones holding
    the evaluation ``context`` (one holding a secret key is refused); with
    ``retain_memory`` (``retain-freed-memory``) they keep freed memory for reuse."""

    def __init__(
        self,
        *,
        context: bytes,
        param_set: str,
        backend: str,
        workers: int,
        retain_memory: bool = True,
    ) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be ≥ 1, received {workers}")
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # a spawned worker ran an unguarded main module: more workers would hang
            sys.stderr.write(f"hedrl: {_MAIN_GUARD}\n")
            sys.stderr.flush()
            os._exit(1)
        # a secret key is refused here, before any worker starts
        self.be, _ = keys.coordinator_backend(
            context, get_param_set(param_set), backend
        )
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._dir = spool_dir()
        self._gone = weakref.finalize(self, shutil.rmtree, self._dir, True)
        (self._dir / "context").write_bytes(context)  # not through spawn's pipe
        self._initargs = (str(self._dir / "context"), param_set, backend, retain_memory)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        if self.workers == 1:
            return
        self._executor = ProcessPoolExecutor(
            max_workers=self.workers - 1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=self._initargs,
        )
        try:  # start every worker (its initializer) now, not in the first step
            list(self._executor.map(int, range(self.workers - 1)))
        except BrokenProcessPool as exc:
            self._stop()
            raise ConfigError(
                "coordinator workers did not start: a worker process died "
                "during start-up (its error is above). A common cause: " + _MAIN_GUARD
            ) from exc

    def __enter__(self) -> ChunkPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes and remove the spool."""
        self._stop(wait=True)
        self._gone()

    def _stop(self, wait: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None

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
        """:func:`step_chunks` over the processes; θ and the masked state come
        back as bytes (they only go on the wire next), the new state as handles.
        Raises :class:`BadChunks` naming every unusable chunk of every shard,
        or :class:`PoolFailed`."""
        n, d, kw = len(theta), self._dir, {"optimizer": optimizer, "k": k}
        if not len(state) == len(grads) == n:
            counts = f"{n} θ, {len(state)} state and {len(grads)} gradient chunks"
            raise ValueError(f"{counts}: expected equal counts")
        own, *others = _shards(n, self.workers)
        futures: list[Future[dict[str, float]]] = []
        failures, mine, timings = [], StepResult([], []), []
        try:
            if others and self._executor is None:
                self._start()  # after a worker died
            args = (theta, state, state_level, unmask, grads, t, hp, mask_next)
            files = [write_shard(self.be, d, sl, args) for sl in others]
            for sl, f in zip(others, files, strict=True):
                job = (f, {**kw, "first_chunk": sl.start})
                futures.append(self._executor.submit(_step_shard, *job))  # type: ignore[union-attr]
            um, nxt = (None if m is None else m[own] for m in (unmask, mask_next))
            mine_args = (theta[own], state[own], state_level, um, grads[own], t, hp)
            try:
                mine = step_chunks(self.be, *mine_args, mask_next=nxt, **kw)  # type: ignore[arg-type]
            except BadChunks as exc:  # the other shards' failures are reported too
                failures += exc.failures
            dump = self.be.to_bytes  # for the wire, while the workers finish
            mine.theta = list(map(dump, mine.theta))  # type: ignore[arg-type]
            if mine.masked is not None:
                mine.masked = [tuple(map(dump, s)) for s in mine.masked]  # type: ignore
            for f in futures:
                if isinstance(exc := f.exception(), BadChunks):
                    failures += exc.failures
                else:
                    timings.append(f.result())
        except BrokenProcessPool as exc:
            self._stop()
            raise PoolFailed(
                "a coordinator worker process died, nothing was stepped; new "
                "workers start at the next step"
            ) from exc
        except OSError as exc:  # the spool is full or gone
            raise PoolFailed(f"coordinator workers: spool {d}: {exc}") from exc
        finally:
            wait(futures)  # never leave a shard running into the next step
        if failures:
            raise BadChunks(failures)
        timings.append(mine.timings)
        out = StepResult(mine.theta, mine.state, masked=mine.masked)
        out.timings = {s: sum(x[s] for x in timings) for s in STEP_STAGES}
        for i in range(own.stop, n):
            out.theta.append((d / f"{i}.new-theta").read_bytes())
            m, v, r = (self.be.load_file(d / f"{i}.new-{x}", level=0) for x in "mVr")
            out.state.append((m, v, r))
            if out.masked is not None:
                m, v, r = ((d / f"{i}.masked-{x}").read_bytes() for x in "mVr")
                out.masked.append((m, v, r))
        return out
