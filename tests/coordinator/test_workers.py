"""The coordinator's worker pool: equal shards through spool files, the same
results as in-process, bad chunks named across shards, dead workers survived."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import coordinator.workers as workers
from coordinator.chunks import BadChunks, step_chunks
from coordinator.workers import (
    ChunkPool,
    PoolFailed,
    _shards,
    spool_dir,
)
from protocol.errors import CiphertextError
from protocol.keys import generate
from tests.helpers import local_federation, local_raw, metrics_rows, plain_step_inputs

HOST = "".join(ch if ch.isalnum() else "_" for ch in socket.gethostname())


def _bytes(res, be):
    """θ, the new state and the masked state of a step, serialised."""
    chunks = [*res.theta, *(c for s in res.state for c in s)]
    chunks += [c for s in res.masked or [] for c in s]
    return [be.to_bytes(c) for c in chunks]


@pytest.fixture(scope="module")
def plain_pub(ps):
    return generate(ps, "plain")[1]


def test_shards_are_equal_and_contiguous():
    """Sizes differ by one at most, the smaller first (the caller's)."""
    assert [(s.start, s.stop) for s in _shards(245, 2)] == [(0, 122), (122, 245)]
    assert [(s.start, s.stop) for s in _shards(5, 3)] == [(0, 1), (1, 3), (3, 5)]
    assert [(s.start, s.stop) for s in _shards(2, 3)] == [(0, 1), (1, 2)]


@pytest.mark.parametrize("n_workers", [1, 2, 3])
@pytest.mark.parametrize("masked", [True, False])
def test_pool_step_equals_in_process_step(ps, plain, plain_pub, n_workers, masked):
    """5 chunks over 1–3 processes (3: shards of 1, 2, 2 chunks): the twin's
    whole step, masked state included, is bit-for-bit the in-process one."""
    args, nxt = plain_step_inputs(ps, plain, n=5, replies=3)
    nxt = nxt if masked else None
    want = step_chunks(plain, *args, mask_next=nxt)
    with ChunkPool(
        context=plain_pub, param_set=ps.id, backend="plain", workers=n_workers
    ) as pool:
        spawned = 0 if pool._executor is None else len(pool._executor._processes)
        for _ in range(2):  # the spool's files are rewritten in the second step
            got = pool.step(*args, mask_next=nxt)
            assert _bytes(got, plain) == _bytes(want, plain)
            assert (got.masked is None) == (not masked)
            assert all(c.level == 0 for s in got.state for c in s)
    assert spawned == n_workers - 1


def test_bad_chunks_are_named_in_every_shard(ps, plain, plain_pub):
    """Unusable chunks in the caller's shard (chunk 0) and in both workers'
    (chunks 2 and 4) are all named with the reply they came from; the next
    step of the same pool, inputs mended, is the in-process one."""
    args, nxt = plain_step_inputs(ps, plain, n=5, replies=3)
    theta, state, top, masks, grads, t, hp = args
    bad_grads = [list(g) for g in grads]
    bad_grads[0][1] = b"junk"
    bad_grads[4][2] = grads[4][2][:100]
    bad_state = list(state)
    bad_state[2] = (state[2][0], b"", state[2][2])
    bad = (theta, bad_state, top, masks, bad_grads, t, hp)
    with ChunkPool(
        context=plain_pub, param_set=ps.id, backend="plain", workers=3
    ) as pool:
        with pytest.raises(BadChunks) as caught:
            pool.step(*bad, mask_next=nxt)
        got = pool.step(*args, mask_next=nxt)
    named = sorted((f.source, f.index, f.chunk) for f in caught.value.failures)
    assert named == [("gradient", 1, 0), ("gradient", 2, 4), ("refresh", 0, 2)]
    assert all("CiphertextError" in f.error for f in caught.value.failures)
    assert _bytes(got, plain) == _bytes(step_chunks(plain, *args, mask_next=nxt), plain)


def test_a_dead_worker_fails_the_step_and_the_next_one_starts_new_workers(
    ps, plain, plain_pub
):
    """A worker killed (SIGKILL, as a segfault ends it): the step raises
    PoolFailed, a HedrlError the round survives, and the next step starts a
    new worker and is the in-process one."""
    args, nxt = plain_step_inputs(ps, plain, n=4, replies=2)
    want = step_chunks(plain, *args, mask_next=nxt)
    with ChunkPool(
        context=plain_pub, param_set=ps.id, backend="plain", workers=2
    ) as pool:
        (proc,) = pool._executor._processes.values()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        with pytest.raises(PoolFailed, match="worker process died"):
            pool.step(*args, mask_next=nxt)
        got = pool.step(*args, mask_next=nxt)
        (new,) = pool._executor._processes.values()
        assert new.pid != proc.pid
    assert _bytes(got, plain) == _bytes(want, plain)


def test_a_dead_worker_skips_one_round_of_a_federation(tmp_path, monkeypatch):
    """Through the whole federation (twin, 3 chunks on 2 processes): the worker
    killed in round 2 costs that round's step only; the state is kept, and
    rounds 3 and 4 step with new workers."""
    real_step = ChunkPool.step
    calls = []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            for proc in list(self._executor._processes.values()):
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(timeout=30)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(ChunkPool, "step", step)
    raw = local_raw(
        tmp_path,
        **{
            "backend": "plain",
            "num-rounds": 4,
            "num-participants": 3,
            "seed": 5,
            "coordinator-workers": 2,
            "round-timeout": 5.0,
        },
    )
    fed = local_federation(raw, 717)
    fed.run()
    rows = metrics_rows(fed)
    assert [r["stepped"] for r in rows] == [True, False, True, True]
    assert len(calls) == 4


def test_spool_holds_the_workers_chunks_and_goes_on_close(ps, plain, plain_pub):
    """The spawned workers' chunks, one file each, the masks and the context in
    a private directory under /dev/shm; closing the pool removes it."""
    args, nxt = plain_step_inputs(ps, plain, n=3, replies=2)
    with ChunkPool(
        context=plain_pub, param_set=ps.id, backend="plain", workers=2
    ) as pool:
        d = pool._dir
        pool.step(*args, mask_next=nxt)
        names = {f.name for f in d.iterdir()}
        assert d.parent == workers.SHM and d.stat().st_mode & 0o777 == 0o700
    assert d.name.startswith(f"hedrl-pool-{HOST}-{os.getpid()}-")
    per_chunk = {"theta", "grad-0", "grad-1"}
    for kind in ("refresh", "new", "masked"):
        per_chunk |= {f"{kind}-{x}" for x in "mVr"}
    per_chunk.add("new-theta")
    want = {f"{i}.{x}" for i in (1, 2) for x in per_chunk}
    assert names == want | {"context", "unmask-1.npy", "next-1.npy"}
    assert not d.exists()


def test_a_killed_coordinators_spool_is_removed_by_the_next(tmp_path):
    """Only this host's directories of processes that no longer exist are
    removed (another host's process ids say nothing here)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"hedrl-pool-{HOST}-{dead.pid}-abc"
    (stale / "sub").mkdir(parents=True)
    (stale / "1.theta").write_bytes(b"x" * 100)
    live = tmp_path / f"hedrl-pool-{HOST}-{os.getpid()}-def"
    foreign = tmp_path / f"hedrl-pool-{HOST}x-{dead.pid}-ghi"
    other = tmp_path / "unrelated"
    for d in (live, foreign, other):
        d.mkdir()
    new = spool_dir(tmp_path)
    assert not stale.exists()
    assert live.exists() and foreign.exists() and other.exists() and new.is_dir()
    assert new.stat().st_mode & 0o777 == 0o700


def test_a_spool_that_cannot_be_written_fails_the_step(ps, plain, plain_pub):
    """The directory gone (as a full /dev/shm would): PoolFailed, a HedrlError."""
    args, nxt = plain_step_inputs(ps, plain, n=3, replies=2)
    with ChunkPool(
        context=plain_pub, param_set=ps.id, backend="plain", workers=2
    ) as pool:
        for f in pool._dir.iterdir():
            f.unlink()
        pool._dir.rmdir()
        with pytest.raises(PoolFailed, match="spool"):
            pool.step(*args, mask_next=nxt)


def test_chunk_files_load_like_chunk_bytes(ps, ckks_pair, tmp_path):
    """SEAL reads a spool file itself: the same ciphertext as from bytes, and the
    same checks (foreign or truncated content, wrong level) with clear errors."""
    part, coord, _, _ = ckks_pair
    rng = np.random.default_rng(5)
    top = ps.depth
    data = part.encrypt(rng.uniform(-1, 1, ps.slots))
    path = tmp_path / "c"
    path.write_bytes(data)
    ct = coord.load_file(path, level=top)
    assert coord.dump(ct) == coord.dump(coord.load(data, level=top))
    coord.dump_file(coord.to_bottom(ct), tmp_path / "d")
    back = coord.load_file(tmp_path / "d", level=0)
    np.testing.assert_allclose(
        part.decrypt(coord.dump(back), level=0),
        part.decrypt(data, level=top),
        atol=1e-6,
    )
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CiphertextError, match="bytes is not a ciphertext"):
        coord.load_file(path, level=top)
    path.write_bytes(data)
    with pytest.raises(CiphertextError, match="expected level 0"):
        coord.load_file(path, level=0)
    with pytest.raises(CiphertextError, match="no bytes is not a ciphertext"):
        coord.load_file(Path(tmp_path / "missing"), level=top)
