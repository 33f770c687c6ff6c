"""Shards' chunks travel to and from the worker processes through spool files."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.spool import Blob, Spool, _owner, spill, unspill, write_file
from coordinator.workers import ChunkPool, _rebalanced, _shards, step_chunks
from protocol.errors import CiphertextError
from protocol.keys import generate
from tests.helpers import plain_step_inputs, spooled_inputs


def test_spill_round_trip_keeps_structure_and_contents(tmp_path):
    """Bytes and arrays go to the file, markers stand in for them, everything
    else is kept; reading back gives equal values."""
    rng = np.random.default_rng(1)
    arr = rng.normal(size=(3, 5))
    tree = (
        [b"abc", (b"", b"\x00" * 70_000), None],
        7,
        [[arr, rng.integers(0, 9, 4)]],
        "name",
    )
    path = tmp_path / "x"
    packed = spill(tree, path)
    assert isinstance(packed[0][0], Blob) and packed[1] == 7 and packed[3] == "name"
    assert packed[0][2] is None
    assert path.stat().st_size == 3 + 70_000 + arr.nbytes + 4 * 8
    back = unspill(packed, path)
    assert back[0][0] == b"abc" and back[0][1] == (b"", b"\x00" * 70_000)
    assert isinstance(back[0][1], tuple) and isinstance(back[0], list)
    np.testing.assert_array_equal(back[2][0][0], arr)
    assert back[2][0][0].dtype == arr.dtype and back[2][0][0].shape == (3, 5)
    np.testing.assert_array_equal(back[2][0][1], tree[2][0][1])


def test_spill_rewrites_the_file_in_place(tmp_path):
    """A second, shorter spill into the same file leaves no tail of the first,
    and a tree with no bytes gives an empty file."""
    path = tmp_path / "x"
    spill([b"a" * 50_000, b"b" * 50_000], path)
    packed = spill([b"c" * 10, b"dd"], path)
    assert path.stat().st_size == 12
    assert unspill(packed, path) == [b"c" * 10, b"dd"]
    assert unspill(spill([None, 1, []], path), path) == [None, 1, []]
    assert path.stat().st_size == 0


def test_spool_directory_goes_on_close(tmp_path):
    spool = Spool(tmp_path)
    assert spool.dir.parent == tmp_path and spool.path("in-1") == spool.path("in-1")
    assert spool.dir.name.startswith(f"hedrl-pool-{_owner()}-{os.getpid()}-")
    spool.path("in-1").write_bytes(b"x")
    spool.close()
    assert not spool.dir.exists()
    spool.close()  # twice is fine


def test_a_killed_coordinators_spool_is_removed_by_the_next(tmp_path):
    """Only this host's directories of processes that no longer exist are
    removed (another host's process ids say nothing here)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"hedrl-pool-{_owner()}-{dead.pid}-abc"
    (stale / "sub").mkdir(parents=True)
    (stale / "in-1").write_bytes(b"x" * 100)
    live = tmp_path / f"hedrl-pool-{_owner()}-{os.getpid()}-def"
    foreign = tmp_path / f"hedrl-pool-{_owner()}x-{dead.pid}-ghi"
    other = tmp_path / "unrelated"
    for d in (live, foreign, other):
        d.mkdir()
    spool = Spool(tmp_path)
    assert not stale.exists()
    assert live.exists() and foreign.exists() and other.exists()
    assert spool.dir.exists()
    spool.close()


def _same(got, want, be):
    assert len(got.theta) == len(want.theta)
    assert [be.to_bytes(c) for c in got.theta] == [be.dump(c) for c in want.theta]
    for g, w in zip(
        [c for s in got.state for c in s],
        [c for s in want.state for c in s],
        strict=True,
    ):
        np.testing.assert_array_equal(g.data, w.data)
    assert got.masked == [
        tuple(be.dump(c) if not isinstance(c, bytes) else c for c in s)
        for s in want.masked
    ]


def _spool_names(chunks, replies):
    names = set()
    for i in chunks:
        names |= {f"{i}.theta", f"{i}.new-theta"}
        names |= {f"{i}.{kind}-{n}" for kind in ("refresh", "masked") for n in "mVr"}
        names |= {f"{i}.new-{n}" for n in ("m", "V", "r")}
        names |= {f"{i}.grad-{r}" for r in range(replies)}
    return names


def test_pool_reuses_its_spool_files_and_removes_its_directory(ps, plain):
    """The spawned workers' chunks, one file each, and a file of masks per
    worker, rewritten every step; closing the pool removes the directory."""
    _, pub, _ = generate(ps, "plain")
    args, nxt = plain_step_inputs(ps, plain)
    want = step_chunks(plain, *args, mask_next=nxt)
    with ChunkPool(context=pub, param_set=ps.id, backend="plain", workers=3) as pool:
        assert pool._spool is not None
        spool_dir = pool._spool.dir
        for _ in range(2):
            got = pool.step(*args, mask_next=nxt)
            _same(got, want, plain)
            names = {f.name for f in spool_dir.iterdir()}
            # 3 chunks on 3 processes: chunks 1 and 2 went to the spawned ones
            assert names == {"in-1", "in-2"} | _spool_names([1, 2], replies=4)
    assert not spool_dir.exists()


def test_pool_falls_back_to_the_pipe_when_the_spool_is_gone(ps, plain, caplog):
    """If the spool cannot be written (deleted, full), the step still gives
    the same result, the chunks go in-band, and the log says so once."""
    _, pub, _ = generate(ps, "plain")
    args, nxt = plain_step_inputs(ps, plain)
    want = step_chunks(plain, *args, mask_next=nxt)
    with ChunkPool(context=pub, param_set=ps.id, backend="plain", workers=2) as pool:
        assert pool._spool is not None
        shutil.rmtree(pool._spool.dir)
        with caplog.at_level(logging.WARNING, logger="flwr.hedrl.coordinator"):
            _same(pool.step(*args, mask_next=nxt), want, plain)
            _same(pool.step(*args, mask_next=nxt), want, plain)
        assert pool._spool is None
    warned = [r for r in caplog.records if "through the pipe" in r.getMessage()]
    assert len(warned) == 1 and "cannot write" in warned[0].getMessage()


@pytest.mark.parametrize("workers", [2, 3])
def test_pool_without_masks_for_the_next_round(ps, plain, workers):
    """mask_next=None (a step whose state is not pre-masked) through the spool."""
    _, pub, _ = generate(ps, "plain")
    args, _ = plain_step_inputs(ps, plain)
    want = step_chunks(plain, *args)
    with ChunkPool(
        context=pub, param_set=ps.id, backend="plain", workers=workers
    ) as pool:
        got = pool.step(*args)
    assert got.masked is None
    assert got.theta == [plain.dump(c) for c in want.theta]  # θ as bytes


@pytest.mark.parametrize(
    ("n", "weights", "sizes"),
    [
        (245, [1.0, 1.0], [123, 122]),  # near-equal with equal weights
        (10, [3.0, 1.0], [7, 3]),  # 2 spare chunks reserved, 8 split 6:2
        (3, [5.0, 1.0, 1.0], [1, 1, 1]),  # one chunk each while there are enough
        (2, [1.0, 1.0, 1.0], [1, 1]),  # fewer chunks than processes
        (100, [1.2, 0.9, 0.9], [40, 30, 30]),
    ],
)
def test_shards_follow_the_weights(n, weights, sizes):
    shards = _shards(n, weights)
    assert [sl.stop - sl.start for sl in shards] == sizes
    assert shards[0].start == 0 and shards[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:], strict=False))


def test_rebalancing_moves_chunks_to_the_faster_process():
    """The worker took 20 % longer for the same chunks (moving them): half of
    that difference goes into the weights at once, the rest over later steps."""
    w = _rebalanced([1.0, 1.0], [100, 100], [8.0, 9.6])
    speed = np.array([100 / 8.0, 100 / 9.6])
    speed /= speed.mean()
    np.testing.assert_allclose(w, 0.5 + 0.5 * speed, rtol=1e-12)
    assert w[0] > 1.0 > w[1] and abs(np.mean(w) - 1.0) < 1e-12
    for _ in range(20):  # the same speeds every step: the weights converge to them
        sizes = [sl.stop - sl.start for sl in _shards(200, w)]
        w = _rebalanced(w, sizes, [sizes[0] / 12.5, sizes[1] / (100 / 9.6)])
    np.testing.assert_allclose(w, speed, rtol=1e-2)


def test_chunk_files_load_like_chunk_bytes(ps, ckks_pair, tmp_path):
    """SEAL reads a spool file itself: the same ciphertext as from bytes, and the
    same checks (foreign or truncated content, wrong level) with clear errors."""
    part, coord, _, _ = ckks_pair
    rng = np.random.default_rng(5)
    top = ps.depth
    data = part.encrypt(rng.uniform(-1, 1, ps.slots))
    path = tmp_path / "c"
    write_file(path, data)
    ct = coord.load_file(path, level=top)
    assert coord.dump(ct) == coord.dump(coord.load(data, level=top))
    coord.dump_file(coord.to_bottom(ct), tmp_path / "d")
    back = coord.load_file(tmp_path / "d", level=0)
    np.testing.assert_allclose(
        part.decrypt(coord.dump(back), level=0),
        part.decrypt(data, level=top),
        atol=1e-6,
    )
    write_file(path, data[: len(data) // 2])
    with pytest.raises(CiphertextError, match="bytes is not a ciphertext"):
        coord.load_file(path, level=top)
    write_file(path, data)
    with pytest.raises(CiphertextError, match="expected level 0"):
        coord.load_file(path, level=0)
    with pytest.raises(CiphertextError, match="no bytes is not a ciphertext"):
        coord.load_file(tmp_path / "missing", level=top)


def test_worker_sends_its_results_in_band_when_it_cannot_write_them(
    ps, plain, tmp_path, monkeypatch
):
    """The worker's side, run here: inputs from spool files, an output directory
    that cannot be written → the same results, as bytes through the pipe."""
    import coordinator.workers as workers

    monkeypatch.setattr(workers, "_worker_be", plain)
    args, nxt = plain_step_inputs(ps, plain, n=2, replies=2)
    want = step_chunks(plain, *args, mask_next=nxt)
    packed = spooled_inputs(args, nxt, tmp_path)
    kwargs = {"optimizer": "he-adam", "k": 1.0, "first_chunk": 0}
    got = workers._step_shard_spooled(
        tmp_path / "in-1", tmp_path / "gone", packed, kwargs
    )
    assert all(isinstance(c, bytes) for c in got.theta)
    flat = [got.theta + [c for s in got.state for c in s]]
    flat.append(want.theta + [c for s in want.state for c in s])
    for g, w in zip(*flat, strict=True):
        np.testing.assert_array_equal(plain.load(g, level=0).data, w.data)
    assert got.masked == want.masked
    ok = workers._step_shard_spooled(tmp_path / "in-1", tmp_path, packed, kwargs)
    assert all(isinstance(c, Path) for c in ok.theta)  # written where it could
    assert [plain.load_file(c, level=0).data.tolist() for c in ok.theta] == [
        c.data.tolist() for c in want.theta
    ]
