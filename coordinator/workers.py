"""The coordinator's worker pool: :func:`step_chunks` over equal contiguous shards.

The chunks of a step are cut into one contiguous shard per process: the
calling process steps the first itself, spawned worker processes the others.
Processes, not threads: sealapi's calls hold the GIL (2 threads took 38 ms per
chunk where one took 34), and TenSEAL's own thread dispatch (``n_threads``),
which does run a batched ``CKKSTensor``'s ciphertexts in parallel, covers only
the circuit: parsing, unmasking and masking with per-slot masks have no batched
form there, and they are a third of the step (measured, see the pool's A/B in
docs/benchmark-history.md).

Chunks travel as files, not through the executor's pipe (60–130 MB/s here; a
1M-parameter shard is ~190 MB in and ~110 MB out): every input chunk of a
worker's shard is written to a private directory in RAM (/dev/shm) before the
shards are handed out, SEAL loads and saves them there itself
(:meth:`Backend.load_file`, :meth:`Backend.dump_file`), and the masks go in one
``.npy`` file per shard. The directory goes when the pool closes; one left by a
killed coordinator is removed by the next pool on the same host.

Keys: each worker loads the *evaluation* context once, through
:func:`protocol.keys.coordinator_backend`, which refuses a context holding a
secret key — a worker can never decrypt. A bad chunk in any shard is reported
with the others (:class:`BadChunks`, naming the reply it came from). A worker
that dies (``BrokenProcessPool``) fails the step with :class:`PoolFailed`,
which the round survives with its state kept; the next step starts new workers.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.chunks import (
    STEP_STAGES,
    BadChunks,
    Chunk,
    Failure,
    Premasked,
    StepResult,
    mask_state,
    masks_by_chunk,
    step_chunks,
)
from protocol import keys
from protocol.adam import AdamHyper
from protocol.backend import Backend, Ct
from protocol.errors import ConfigError, HedrlError
from protocol.memory import retain_freed_memory
from protocol.params import get_param_set

__all__ = [  # the chunk work is re-exported for the federation's imports
    "POOL_STAGES",
    "STEP_STAGES",
    "BadChunks",
    "Chunk",
    "ChunkPool",
    "Failure",
    "PoolFailed",
    "Premasked",
    "StepResult",
    "auto_workers",
    "mask_state",
    "masks_by_chunk",
    "step_chunks",
]

#: where :meth:`ChunkPool.step` spends its caller's wall time: writing the
#: workers' chunks to the spool, its own shard, waiting for the last worker,
#: collecting the workers' results
POOL_STAGES = ("spill_s", "own_s", "wait_s", "collect_s")
#: RAM-backed on Linux; elsewhere (or if not writable) the temporary directory
SHM = Path("/dev/shm")
PREFIX = "hedrl-pool-"
_MAIN_GUARD = (
    "coordinator worker processes (run-config coordinator-workers) start by "
    "importing the main module; a script that builds a Federation must do so "
    'under `if __name__ == "__main__":`, or set coordinator-workers=0'
)


class PoolFailed(HedrlError):
    """The pool could not step (a worker died, the spool could not be written);
    nothing was stepped, and the next step starts new workers."""


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


# ---- the spool: a private directory of chunk files ---------------------------------
def _owner() -> str:
    """This host's part of a spool's name: a process id only means something on
    the host (container) that made it, and /dev/shm can be shared."""
    host = "".join(ch if ch.isalnum() else "_" for ch in socket.gethostname())
    return host or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(base: Path) -> list[Path]:
    """Remove spool directories of this host whose coordinator process is gone
    (killed before it could close its pool); returns what was removed."""
    gone, mine = [], f"{PREFIX}{_owner()}-"
    for d in base.glob(mine + "*"):
        pid = d.name[len(mine) :].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def spool_dir(base: Path | None = None) -> Path:
    """A new private directory (mode 0700) under /dev/shm, stale ones removed."""
    if base is None:
        usable = SHM.is_dir() and os.access(SHM, os.W_OK | os.X_OK)
        base = SHM if usable else Path(tempfile.gettempdir())
    remove_stale(base)
    prefix = f"{PREFIX}{_owner()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def write_file(path: Path, data: bytes) -> None:
    """``data`` into ``path``, rewritten in place: tmpfs keeps the file's pages
    from the last step (190 MB took 0.05 s so, 0.08–0.16 s into new files)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.truncate()


def write_shard(
    be: Backend, d: Path, first: int, args: tuple[Any, ...], mask_next: Any
) -> None:
    """A shard's inputs (:func:`step_chunks`'s positional ``args`` for chunks
    ``first`` on) as the files :func:`_step_shard` reads in ``d``."""
    theta, state, _, unmask, grads, _, _ = args
    for i, (th, st, gr) in enumerate(zip(theta, state, grads, strict=True), first):
        named = [
            (th, "theta"),
            *((c, f"refresh-{x}") for c, x in zip(st, "mVr", strict=True)),
        ]
        for c, name in named + [(g, f"grad-{r}") for r, g in enumerate(gr)]:
            if isinstance(c, Ct):
                be.dump_file(c, d / f"{i}.{name}")
            else:
                write_file(
                    d / f"{i}.{name}", c if isinstance(c, bytes) else c.read_bytes()
                )
    for masks, name in ((unmask, "unmask"), (mask_next, "next")):
        if masks is not None:
            np.save(d / f"{name}-{first}.npy", np.asarray(masks, dtype=np.float64))


# ---- worker side --------------------------------------------------------------------
_worker_be: Backend | None = None


def _init_worker(context: str, param_set: str, backend: str, retain: bool) -> None:
    global _worker_be
    if retain:
        retain_freed_memory()
    data = Path(context).read_bytes()
    _worker_be, _ = keys.coordinator_backend(data, get_param_set(param_set), backend)


def _ready(_: int) -> bool:
    return _worker_be is not None


def _step_shard(
    d: Path, first: int, n: int, replies: int, rest: tuple[Any, ...], kw: dict
) -> dict[str, float]:
    """A worker's shard, chunks ``first`` … ``first + n − 1``, from the files in
    ``d``; the new chunks go back there. ``rest`` = (state level, t, hp, with
    unmask masks, with next masks); returns the stages' seconds."""
    level, t, hp, unmask, nxt = rest
    ids = range(first, first + n)
    be = _worker_be
    assert be is not None, "worker used before its initializer ran"
    res = step_chunks(
        be,
        [d / f"{i}.theta" for i in ids],
        [tuple(d / f"{i}.refresh-{x}" for x in "mVr") for i in ids],
        level,
        np.load(d / f"unmask-{first}.npy") if unmask else None,
        [[d / f"{i}.grad-{r}" for r in range(replies)] for i in ids],
        t,
        hp,
        mask_next=np.load(d / f"next-{first}.npy") if nxt else None,
        first_chunk=first,
        **kw,
    )
    for j, i in enumerate(ids):
        out = [("new-theta", res.theta[j])]
        out += ((f"new-{x}", c) for x, c in zip("mVr", res.state[j], strict=True))
        if res.masked is not None:
            out += (
                (f"masked-{x}", c) for x, c in zip("mVr", res.masked[j], strict=True)
            )
        for name, c in out:
            be.dump_file(c, d / f"{i}.{name}")  # type: ignore[arg-type]
    return res.timings


# ---- coordinator side ---------------------------------------------------------------
def _shards(n: int, parts: int) -> list[slice]:
    """Contiguous slices of range(n), sizes differing by at most one (the
    smaller first: the caller also writes and collects); empty ones dropped."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _pick(sl: slice, args: tuple[Any, ...], nxt: Any) -> tuple[tuple[Any, ...], Any]:
    theta, state, level, unmask, grads, t, hp = args
    um = None if unmask is None else unmask[sl]
    picked = (theta[sl], state[sl], level, um, grads[sl], t, hp)
    return picked, None if nxt is None else nxt[sl]


class ChunkPool:
    """The coordinator's process plus spawned workers holding the evaluation context.

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
    retain_memory : bool, default True
        The workers keep freed memory for reuse
        (:func:`protocol.memory.retain_freed_memory`, run-config
        ``retain-freed-memory``).
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
        if workers < 1:
            raise ConfigError(f"workers must be ≥ 1, received {workers}")
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # A worker being spawned imports the user's main module, which builds
            # a Federation again: starting workers from here would deadlock, so
            # say why and leave; the parent reports it.
            sys.stderr.write(f"hedrl: {_MAIN_GUARD}\n")
            sys.stderr.flush()
            os._exit(1)
        # fail here, in the caller's process, before any worker starts
        self.be, _ = keys.coordinator_backend(
            context, get_param_set(param_set), backend
        )
        self.workers = workers
        #: the last step's :data:`POOL_STAGES` (seconds, the caller's wall time)
        self.times = dict.fromkeys(POOL_STAGES, 0.0)
        #: chunks each process stepped in the last step (the caller's first)
        self.counts: list[int] = []
        self._executor: ProcessPoolExecutor | None = None
        self._dir: Path | None = None
        if workers == 1:
            return
        self._dir = spool_dir()
        self._gone = weakref.finalize(self, shutil.rmtree, self._dir, True)
        write_file(self._dir / "context", context)  # not through spawn's pipe
        self._initargs = (str(self._dir / "context"), param_set, backend, retain_memory)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    #: whether the calling process steps the first shard (else: all in workers)
    _caller_steps = True

    def _start(self) -> None:
        spawned = self.workers - (1 if self._caller_steps else 0)
        self._executor = ProcessPoolExecutor(
            max_workers=spawned,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=self._initargs,
        )
        try:  # start every worker now so the first step does not pay for it
            list(self._executor.map(_ready, range(spawned)))
        except BrokenProcessPool as exc:
            self._broken()
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
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._dir is not None:
            self._gone()
            self._dir = None

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
        """:func:`step_chunks` sharded over the processes: the caller's shard
        comes back as handles, the workers' θ and masked state as bytes (they
        only go on the wire until the next step) and their state as handles.
        Raises :class:`BadChunks` naming every unusable chunk of every shard,
        :class:`PoolFailed` if a worker died or the spool failed."""
        n = len(theta)
        if len(state) != n or len(grads) != n:
            raise ValueError(
                f"{n} θ chunks, {len(state)} state chunks, {len(grads)} gradient "
                "chunks: expected equal counts"
            )
        args = (theta, state, state_level, unmask, grads, t, hp)
        kw: dict[str, Any] = {"optimizer": optimizer, "k": k}
        now = time.perf_counter
        start = now()
        own, *others = _shards(n, self.workers)
        if not self._caller_steps:
            own, others = slice(0, 0), [own, *others]
        self.counts = [sl.stop - sl.start for sl in (own, *others)]
        if others and self._executor is None:
            self._start()  # after a worker died
        d = self._dir
        futures: list[Future[dict[str, float]]] = []
        failures: list[Failure] = []
        mine = StepResult([], [])
        try:
            for sl in others:
                write_shard(self.be, d, sl.start, *_pick(sl, args, mask_next))
            rest = (state_level, t, hp, unmask is not None, mask_next is not None)
            for sl in others:
                size, replies = sl.stop - sl.start, len(grads[sl.start])
                futures.append(
                    self._executor.submit(  # type: ignore[union-attr]
                        _step_shard, d, sl.start, size, replies, rest, kw
                    )
                )
            t_own = now()
            mine_args, mine_next = _pick(own, args, mask_next)
            try:
                mine = step_chunks(
                    self.be,
                    *mine_args,
                    mask_next=mine_next,
                    first_chunk=own.start,
                    **kw,
                )
            except BadChunks as exc:  # the other shards' failures are reported too
                failures += exc.failures
            t_wait = now()
            timings = [f.result() for f in futures if not _bad(f, failures)]
        except BrokenProcessPool as exc:
            self._broken()
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
        t_collect = now()
        out = StepResult(list(mine.theta), list(mine.state), masked=mine.masked)
        out.timings = {
            s: sum(x[s] for x in [mine.timings, *timings]) for s in STEP_STAGES
        }
        for i in range(own.stop, n):
            out.theta.append((d / f"{i}.new-theta").read_bytes())
            m, v, r = (self.be.load_file(d / f"{i}.new-{x}", level=0) for x in "mVr")
            out.state.append((m, v, r))
            if out.masked is not None:
                m, v, r = ((d / f"{i}.masked-{x}").read_bytes() for x in "mVr")
                out.masked.append((m, v, r))
        spans = (t_own - start, t_wait - t_own, t_collect - t_wait, now() - t_collect)
        self.times = dict(zip(POOL_STAGES, spans, strict=True))
        return out

    def _broken(self) -> None:
        """Drop the executor after a worker died (the others are shut down)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _bad(f: Future[Any], failures: list[Failure]) -> bool:
    """Whether shard ``f`` raised :class:`BadChunks` (its failures added);
    waits for it, and any other exception of it is raised."""
    exc = f.exception()
    if isinstance(exc, BadChunks):
        failures += exc.failures
        return True
    return False
