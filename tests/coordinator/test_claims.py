"""The last chunks of a sharded step go to whichever process is free first."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest

import coordinator.workers as workers
from coordinator.workers import (
    BadChunks,
    ChunkPool,
    Claimed,
    Claims,
    _shared_count,
    step_chunks,
)
from protocol.keys import generate
from tests.helpers import plain_step_inputs, spooled_inputs


def _flat(res, be):
    """θ and the new state of a step, serialised (a pool returns θ so)."""
    return [be.to_bytes(c) for c in res.theta] + [
        be.dump(c) for s in res.state for c in s
    ]


def test_each_shared_chunk_goes_to_one_claimer():
    """Two processes' positions interleaved: own chunks first, then the shared
    ones (chunks 5–7 at positions after the own ones), each claimed once;
    iterating again replays what was claimed and claims nothing twice."""
    claims = Claims(multiprocessing.get_context("spawn"))
    claims.reset(5)
    shared = range(5, 8)
    a, b = Claimed(1, claims, shared), Claimed(1, claims, shared)
    ia, ib = iter(a), iter(b)
    assert [next(ia), next(ib)] == [0, 0]  # own chunk each
    assert [next(ia), next(ib), next(ia)] == [1, 2, 3]  # chunks 5, 6, 7
    assert list(ib) == [] and list(ia) == []  # none left
    assert (a.taken, b.taken) == ([5, 7], [6])
    assert list(a) == [0, 1, 3] and list(b) == [0, 2]  # a retry: the same chunks
    assert list(Claimed(2, None, shared)) == [0, 1]  # nothing shared


def test_shared_count_leaves_each_process_an_own_chunk():
    assert _shared_count(245, 2) == 49
    assert _shared_count(25, 2) == 5
    assert _shared_count(3, 2) == 1
    assert _shared_count(3, 3) == 0
    assert _shared_count(100, 1) == 0


def test_a_slow_process_leaves_the_shared_chunks_to_the_other(ps, plain, monkeypatch):
    """The caller's process made slower (100 ms per homomorphic addition, in
    its own backend only): the spawned worker, done with its own chunks long
    before, steps all shared ones; the result is bit-for-bit the in-process
    step's, and the next split moves chunks to the worker."""
    _, pub, _ = generate(ps, "plain")
    n = 10
    args, nxt = plain_step_inputs(ps, plain, n=n, replies=2)
    want = step_chunks(plain, *args, mask_next=nxt)
    with ChunkPool(context=pub, param_set=ps.id, backend="plain", workers=2) as pool:
        add = pool.be.add

        def slow_add(x, y):
            time.sleep(0.1)
            return add(x, y)

        monkeypatch.setattr(pool.be, "add", slow_add)
        got = pool.step(*args, mask_next=nxt)
        counts, weights = pool.counts, pool.weights
    shared = _shared_count(n, 2)
    assert shared == 2 and counts == [4, 4 + shared]  # 8 own chunks split 4:4
    assert weights[1] > 1.0 > weights[0]
    assert _flat(got, plain) == _flat(want, plain)
    assert got.masked == want.masked
    assert got.chunks == list(range(n))


def test_a_worker_retrying_in_band_keeps_the_chunks_it_claimed(
    ps, plain, tmp_path, monkeypatch
):
    """The worker's side, run here: it claims shared chunk 0, cannot write its
    result (the output directory is gone) and starts again in-band: chunk 0
    again (replayed, not claimed twice), then chunk 1; nothing is left over."""
    claims = Claims(multiprocessing.get_context("spawn"))
    claims.reset(0)
    monkeypatch.setattr(workers, "_worker_be", plain)
    monkeypatch.setattr(workers, "_worker_claims", claims)
    args, nxt = plain_step_inputs(ps, plain, n=2, replies=2)
    want = step_chunks(plain, *args, mask_next=nxt)
    packed = spooled_inputs(args, nxt, tmp_path)
    kwargs = {"optimizer": "he-adam", "k": 1.0, "chunk_ids": [0, 1]}
    got = workers._step_shard_spooled(
        tmp_path / "in-1", tmp_path / "gone", packed, kwargs, (0, 0, 2)
    )
    assert got.chunks == [0, 1] and claims.take(2) is None
    assert all(isinstance(c, bytes) for c in got.theta)
    for g, w in zip(got.theta, want.theta, strict=True):
        np.testing.assert_array_equal(plain.load(g, level=0).data, w.data)
    assert got.masked == want.masked


def _failing_on(monkeypatch, prefix):
    """write_file raising ENOSPC for spool files of chunk ``prefix`` on."""
    real_write = workers.write_file
    failed = []

    def write_file(path, data):
        if path.name.startswith(prefix):
            failed.append(path.name)
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(workers, "write_file", write_file)
    return failed


def test_a_spool_failing_midway_stays_until_the_step_is_done(ps, plain, monkeypatch):
    """Three processes (chunks 0–1 here, 2–3 and 4 in the workers, 5 shared);
    the spool fills up at the second worker's chunk: that worker steps
    nothing, the caller steps chunk 4, the first worker still reads (and
    writes) its files, and the directory goes only after the step. The next
    step goes in-band; both are the in-process step."""
    _, pub, _ = generate(ps, "plain")
    args, nxt = plain_step_inputs(ps, plain, n=6, replies=2)
    want = step_chunks(plain, *args, mask_next=nxt)
    failed = _failing_on(monkeypatch, "4.")
    with ChunkPool(context=pub, param_set=ps.id, backend="plain", workers=3) as pool:
        spool_dir = pool._spool.dir
        got = pool.step(*args, mask_next=nxt)
        assert pool._spool is None and not spool_dir.exists()
        assert failed == ["4.theta"]
        assert pool.counts[2] == 0 and pool.counts[1] >= 2 and sum(pool.counts) == 6
        again = pool.step(*args, mask_next=nxt)  # all in-band now (split by
        assert sum(pool.counts) == 6 and len(pool.counts) == 3  # measured speed)
    for res in (got, again):
        assert _flat(res, plain) == _flat(want, plain)
        assert res.masked == want.masked


def test_a_worker_stops_where_its_files_end(ps, plain, monkeypatch):
    """Two processes, chunks 0–3 here, 4–7 in the worker, 8–9 shared; writing
    chunk 6's files fails: the worker steps 4 and 5 and claims nothing, the
    caller steps the rest; the result is the in-process step's."""
    _, pub, _ = generate(ps, "plain")
    args, nxt = plain_step_inputs(ps, plain, n=10, replies=2)
    want = step_chunks(plain, *args, mask_next=nxt)
    _failing_on(monkeypatch, "6.")
    with ChunkPool(context=pub, param_set=ps.id, backend="plain", workers=2) as pool:
        got = pool.step(*args, mask_next=nxt)
        assert pool.counts == [8, 2]
    assert _flat(got, plain) == _flat(want, plain)
    assert got.masked == want.masked


def test_the_worker_starts_before_its_files_are_all_written(ps, plain, monkeypatch):
    """Writing made slow (30 ms a file): the worker's first new θ is in the
    spool before the caller has written the worker's last chunk."""
    _, pub, _ = generate(ps, "plain")
    args, nxt = plain_step_inputs(ps, plain, n=10, replies=2)
    want = step_chunks(plain, *args, mask_next=nxt)
    real_write = workers.write_file
    seen = []

    with ChunkPool(context=pub, param_set=ps.id, backend="plain", workers=2) as pool:
        first_out = pool._spool.path("4.new-theta")

        def slow_write(path, data):
            time.sleep(0.03)
            if path.name == "7.theta":  # the worker's last own chunk
                seen.append(first_out.exists())
            real_write(path, data)

        monkeypatch.setattr(workers, "write_file", slow_write)
        got = pool.step(*args, mask_next=nxt)
    assert seen == [True]
    assert _flat(got, plain) == _flat(want, plain)


def test_bad_chunks_are_reported_wherever_they_were_claimed(ps, plain):
    """Unparsable chunks in the caller's shard, the worker's and the shared
    part are all named, whoever claimed them; the next step of the same pool
    (inputs mended) is the in-process one."""
    _, pub, _ = generate(ps, "plain")
    n = 10
    args, nxt = plain_step_inputs(ps, plain, n=n, replies=2)
    theta, state, top, masks, grads, t, hp = args
    bad_grads = [list(g) for g in grads]
    bad_grads[0][1] = b"junk"  # the caller's own shard
    bad_grads[9][0] = grads[9][0][:100]  # shared (the last fifth)
    bad_state = list(state)
    bad_state[5] = (state[5][0], b"", state[5][2])  # the worker's own shard
    bad = (theta, bad_state, top, masks, bad_grads, t, hp)
    with ChunkPool(context=pub, param_set=ps.id, backend="plain", workers=2) as pool:
        with pytest.raises(BadChunks) as caught:
            pool.step(*bad, mask_next=nxt)
        got = pool.step(*args, mask_next=nxt)
    named = sorted((f.source, f.index, f.chunk) for f in caught.value.failures)
    assert named == [("gradient", 0, 9), ("gradient", 1, 0), ("refresh", 0, 5)]
    want = step_chunks(plain, *args, mask_next=nxt)
    assert _flat(got, plain) == _flat(want, plain)


def test_ready_counts_and_giving_up():
    claims = Claims(multiprocessing.get_context("spawn"), workers=2)
    claims.set_ready(1, 3)
    assert claims.wait_ready(1, 3) and claims.wait_ready(1, 1)
    start = time.monotonic()
    assert not claims.wait_ready(1, 4, timeout=0.05)  # not yet, and not in time
    assert time.monotonic() - start >= 0.05
    claims.give_up(1, 2)  # two written, the rest never will be: no waiting
    assert claims.wait_ready(1, 2) and not claims.wait_ready(1, 3, timeout=60)


def test_an_error_while_writing_stops_the_worker_and_leaves_the_pool_usable(
    ps, plain, monkeypatch
):
    """Not a full disk but a bug while the worker's files are written: the step
    raises it after the worker has stopped, and the pool's next step is right."""
    _, pub, _ = generate(ps, "plain")
    args, nxt = plain_step_inputs(ps, plain, n=10, replies=2)
    want = step_chunks(plain, *args, mask_next=nxt)
    real_write = workers.write_file

    def broken(path, data):
        if path.name == "5.theta":
            raise RuntimeError("boom")
        real_write(path, data)

    with ChunkPool(context=pub, param_set=ps.id, backend="plain", workers=2) as pool:
        monkeypatch.setattr(workers, "write_file", broken)
        with pytest.raises(RuntimeError, match="boom"):
            pool.step(*args, mask_next=nxt)
        monkeypatch.setattr(workers, "write_file", real_write)
        got = pool.step(*args, mask_next=nxt)
        assert pool._spool is not None and sum(pool.counts) == 10
    assert _flat(got, plain) == _flat(want, plain)
