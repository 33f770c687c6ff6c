"""hedrl-bench at P = 12288 (three full ciphertexts): JSON schema and byte targets.

Bytes are deterministic up to the zstd compression of SEAL's serialisation
(±0.1 %), so the targets of issue 5 are asserted; times are not.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from flwr.proto.message_pb2 import PushObjectRequest

from benchmarks import transport
from benchmarks.bench import (
    STAGES,
    from_wire,
    main,
    markdown_table,
    parse_count,
    parse_list,
    relay,
    to_wire,
)
from benchmarks.bench_report import add_speedups
from coordinator.chunks import BadChunks, step_chunks
from coordinator.workers import ChunkPool
from protocol.adam import AdamHyper, StateUnits
from protocol.errors import SecretKeyRefused
from protocol.keys import generate
from protocol.records import read_vector
from tests.helpers import plain_step_inputs

UPLOAD_TARGET = 50.0  # bytes per filled slot and participant (issue 5)
BROADCAST_TARGET = 33.0  # θ at the bottom level
KEYS = {
    "backend",
    "participants",
    "params",
    "workers",
    "stages_s",
    "round_s",
    "coordinator_s",
    "participant_s",
    "upload_bytes_per_param",
    "upload_bytes_per_slot",
    "broadcast_bytes_per_param",
    "coordinator_params_per_s",
    "padding_waste",
    "retain_freed_memory",
}


def test_wire_is_flowers_object_transport():
    """The bench's records stages move content as flwr 1.42 objects: every id is
    the SHA-256 of its object's content, a vector over 5 MB is split into pieces,
    and the relayed objects inflate back to the same chunks."""
    rng = np.random.default_rng(3)
    chunks = 45  # 45 × 131,195 B ≈ 5.9 MB: two pieces of Flower's ≤ 5 MB
    rd, sent = transport.vectors(3, ["theta", "m"], chunks, transport.BOTTOM_CHUNK, rng)
    wire = to_wire(rd)
    assert wire.root == rd.object_id
    for oid, req in wire.objects.items():
        content = PushObjectRequest.FromString(req).object_content
        assert hashlib.sha256(content).hexdigest() == oid
    data = 2 * chunks * transport.BOTTOM_CHUNK
    assert data < wire.size < data * 1.01
    # per vector: data Array + 2 pieces, its ArrayRecord, the header's
    # ConfigRecord; the lengths Array + its piece are equal in both vectors (same
    # ids), counted once; plus the root RecordDict
    assert len(wire.objects) == 2 * (3 + 1 + 1) + 2 + 1
    back = from_wire(relay(wire))
    for name in ("theta", "m"):
        got = read_vector(back, name, transport._expect(name, chunks))[1]
        assert got == sent[name]


def test_sizes_parse():
    """--params accepts plain integers and k/M suffixes; one value is a list."""
    assert parse_list("10000,100k,1M") == [10_000, 100_000, 1_000_000]
    assert parse_list("12288") == [12288]
    assert parse_count("1.5k") == 1500


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--participants", "2,4", "--params", "12288", "--reps", "1", "--quiet"]
    argv += ["--out", str(out / "bench.json"), "--table", str(out / "bench.md")]
    argv += ["--no-plot"]
    assert main(argv) == 0
    assert (out / "bench.md").read_text().startswith("| backend |")
    return json.loads((out / "bench.json").read_text())


def test_schema(records):
    """One record per K × backend with every field; ckks carries round_ratio."""
    assert sorted((r["participants"], r["backend"]) for r in records) == [
        (2, "ckks"),
        (2, "plain"),
        (4, "ckks"),
        (4, "plain"),
    ]
    for r in records:
        assert KEYS <= set(r), KEYS - set(r)
        assert set(r["stages_s"]) == set(STAGES)
        assert r["params"] == 12288 and r["padding_waste"] == 0.0
        assert r["round_s"] > 0 and r["coordinator_params_per_s"] > 0
        assert ("round_ratio" in r) == (r["backend"] == "ckks")
        # the critical path: parse/sum/unmask/adam are inside step_s, not on top
        st = r["stages_s"]
        assert r["round_s"] == pytest.approx(
            r["coordinator_s"] + r["participant_s"] + st["refresh_s"], rel=1e-12
        )
        assert r["coordinator_s"] == pytest.approx(
            sum(st[k] for k in ("headers_s", "step_s", "broadcast_s", "state_s")),
            rel=1e-12,
        )


def test_bytes_within_targets(records):
    """Seeded uploads ≤ 50 B/param, bottom-level θ ≤ 33 B/param; plain is float64."""
    for r in records:
        if r["backend"] == "ckks":
            assert 40.0 < r["upload_bytes_per_param"] <= UPLOAD_TARGET
            assert 29.0 < r["broadcast_bytes_per_param"] <= BROADCAST_TARGET
        else:  # one level byte per chunk + float64 + the header
            assert 8.0 < r["upload_bytes_per_param"] < 8.1
            assert 8.0 < r["broadcast_bytes_per_param"] < 8.1


def test_pool_refuses_a_secret_context(ps):
    """A worker pool is never given a secret key (refused before any worker starts)."""
    sec, _, _ = generate(ps, "ckks")
    with pytest.raises(SecretKeyRefused):
        ChunkPool(context=sec, param_set=ps.id, backend="ckks", workers=2)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_pool_step_equals_in_process_step(ps, plain, workers):
    """Sharded over this process and workers − 1 spawned ones (1: none, 3: one
    chunk each), the twin's whole step is bit-for-bit the same."""
    _, pub, _ = generate(ps, "plain")
    n = 3
    args, _ = plain_step_inputs(ps, plain, n=n, replies=4)
    want = step_chunks(plain, *args)
    with ChunkPool(
        context=pub, param_set=ps.id, backend="plain", workers=workers
    ) as pool:
        spawned = 0 if pool._executor is None else len(pool._executor._processes)
        got = pool.step(*args)
    assert spawned == workers - 1
    assert len(got.theta) == len(want.theta) == n
    # θ comes back serialised (it only goes on the wire next)
    assert [plain.to_bytes(c) for c in got.theta] == [plain.dump(c) for c in want.theta]
    for g, w in zip(
        [c for s in got.state for c in s],
        [c for s in want.state for c in s],
        strict=True,
    ):
        assert g.level == w.level == 0 and g.factor == w.factor
        np.testing.assert_array_equal(g.data, w.data)


def _ckks_inputs(ps, part, coord, seed: int, n: int, replies: int):
    """θ (bottom level), (m, V, r) and ``replies`` gradients for ``n`` chunks."""
    rng = np.random.default_rng(seed)

    def enc(lo=-0.01, hi=0.01):
        return part.encrypt(rng.uniform(lo, hi, ps.slots))

    top = ps.depth
    theta = [
        coord.dump(coord.to_bottom(coord.load(enc(), level=top))) for _ in range(n)
    ]
    state = [(enc(), enc(0.01, 0.1), enc(3.0, 10.0)) for _ in range(n)]
    grads = [[enc() for _ in range(replies)] for _ in range(n)]
    return theta, state, grads, rng


def test_pool_reports_every_bad_chunk(ps, ckks_pair):
    """A truncated gradient chunk and a foreign refresh chunk are both named,
    in the workers as in-process, and nothing is returned."""
    part, coord, _, key_dir = ckks_pair
    ctx = (key_dir / "coordinator.ctx").read_bytes()
    top = ps.depth
    theta, state, grads, _ = _ckks_inputs(ps, part, coord, 3, n=2, replies=3)
    grads[1][2] = grads[1][2][:1000]  # reply 2, chunk 1: truncated
    state[0] = (b"\x00" * 5000, state[0][1], state[0][2])  # refresh chunk 0: junk
    args = (theta, state, top, None, grads, 1, AdamHyper())
    with pytest.raises(BadChunks) as inproc:
        step_chunks(coord, *args)
    with ChunkPool(context=ctx, param_set=ps.id, backend="ckks", workers=2) as pool:
        with pytest.raises(BadChunks) as pooled:
            pool.step(*args)
    for exc in (inproc.value, pooled.value):
        got = sorted((f.source, f.index, f.chunk) for f in exc.failures)
        assert got == [("gradient", 2, 1), ("refresh", 0, 0)]
        assert all("CiphertextError" in f.error for f in exc.failures)


def test_pool_step_equals_in_process_step_ckks(ps, ckks_pair):
    """CKKS evaluation is deterministic: sharded or not, the same bytes come out."""
    part, coord, _, key_dir = ckks_pair
    ctx = (key_dir / "coordinator.ctx").read_bytes()
    top, n = ps.depth, 3
    theta, state, grads, rng = _ckks_inputs(ps, part, coord, 4, n=n, replies=2)
    masks = [[rng.uniform(-1, 1, ps.slots) for _ in range(3)] for _ in range(n)]
    bound = 2.0**20  # mask-bits 20, the default
    nxt = [[rng.uniform(-bound, bound, ps.slots) for _ in range(3)] for _ in range(n)]
    args = (theta, state, top, masks, grads, 2, AdamHyper())
    out = StateUnits.of(coord, AdamHyper()).out
    want = step_chunks(coord, *args, mask_next=nxt)
    with ChunkPool(context=ctx, param_set=ps.id, backend="ckks", workers=2) as pool:
        got = pool.step(*args, mask_next=nxt)
    # the same θ either way (the workers' serialised), at the bottom level
    assert [coord.to_bytes(c) for c in got.theta] == [coord.dump(c) for c in want.theta]
    assert all(coord.load(coord.to_bytes(c), level=0).level == 0 for c in got.theta)
    flat = [[c for s in r.state for c in s] for r in (got, want)]
    assert len(flat[0]) == len(flat[1]) == 3 * n
    for g, w in zip(*flat, strict=True):
        assert g.level == w.level == 0
        assert coord.dump(g) == coord.dump(w)
    # the state masked for the next refresher, where it was masked (chunk 0
    # here, chunks 1–2 in the worker): the same ciphertexts either way
    assert got.masked is not None and want.masked is not None
    for i in range(n):
        for j in range(3):
            g, w = coord.to_bytes(got.masked[i][j]), coord.dump(want.masked[i][j])
            assert g == w
            # decrypted: the new state plus the mask. Adding a public vector
            # adds only its encoding error (2^20 at Δ = 2^35: ~1e-9 absolute,
            # measured 2.9e-9); 1e-6 is the tolerance, a wrong or misplaced
            # mask is off by ~1e5
            # (both in the stored units: data = StateUnits.out·value)
            veiled = part.decrypt(w, level=0)
            plain_new = part.decrypt(coord.dump(want.state[i][j]), level=0)
            np.testing.assert_allclose(
                veiled - out[j] * nxt[i][j], plain_new, atol=1e-6
            )


def _rec(workers: int, coord: float, step: float, cpu: float) -> dict:
    """A bench record with ``cpu`` step-stage seconds, spread over the stages."""
    stages = dict.fromkeys(STAGES, 0.0)
    stages.update(step_s=step, parse_s=0.25 * cpu, adam_s=0.75 * cpu)
    return {
        "backend": "ckks",
        "participants": 4,
        "params": 12288,
        "param_set": "8k-35x3",
        "workers": workers,
        "coordinator_s": coord,
        "stages_s": stages,
        "round_s": coord + 1.0,
        "coordinator_params_per_s": 12288 / coord,
        "upload_bytes_per_param": 49.3,
        "broadcast_bytes_per_param": 32.0,
        "padding_waste": 0.0,
    }


def test_speedup_against_one_process_and_the_cpu_it_got():
    """Two processes: speed-up over the one-process record of the same sweep,
    and the bound the shards' own (inflated) stage times allow."""
    one, two = _rec(0, 10.0, 9.0, 9.0), _rec(2, 6.0, 5.0, 9.9)
    other_k = dict(_rec(2, 1.0, 1.0, 1.0), participants=8)  # no 1-process twin
    recs = [one, two, other_k]
    add_speedups(recs)
    assert two["speedup"] == pytest.approx(10.0 / 6.0)
    assert two["step_speedup"] == pytest.approx(9.0 / 5.0)
    assert two["cpu_inflation"] == pytest.approx(1.1)
    assert two["step_speedup_bound"] == pytest.approx(2 / 1.1)
    assert two["sharding_efficiency"] == pytest.approx((9.0 / 5.0) / (2 / 1.1))
    # outside the step 10 − 9 = 1 s stays serial; the step at most 9 / (2/1.1)
    assert two["serial_fraction"] == pytest.approx(0.1)
    assert two["speedup_bound"] == pytest.approx(10.0 / (1.0 + 9.0 * 1.1 / 2))
    assert two["speedup_efficiency"] == pytest.approx(
        (10.0 / 6.0) / two["speedup_bound"]
    )
    assert "speedup" not in one and "speedup" not in other_k
    table = markdown_table([one, two])
    row = table.splitlines()[-1]
    assert row.endswith("| 1.67× / 1.68× (1.80× / 1.82×) |"), row


def test_sweep_with_workers_reports_speedup(tmp_path):
    """--workers 0,2 in one sweep: the 2-process records carry their speed-up
    fields, computed from the 0-process records of the same run."""
    out = tmp_path / "bench.json"
    argv = ["--participants", "2", "--params", "12288", "--reps", "1", "--quiet"]
    argv += ["--workers", "0,2", "--backends", "ckks", "--warmup", "0"]
    argv += ["--out", str(out), "--no-plot"]
    assert main(argv) == 0
    recs = {r["workers"]: r for r in json.loads(out.read_text())}
    assert set(recs) == {0, 2}
    zero, two = recs[0], recs[2]
    assert "speedup" not in zero
    assert two["speedup"] == pytest.approx(zero["coordinator_s"] / two["coordinator_s"])
    assert two["sharding_efficiency"] == pytest.approx(
        two["step_speedup"] / two["step_speedup_bound"]
    )
    assert 0 < two["serial_fraction"] < 1
    assert two["speedup_efficiency"] == pytest.approx(
        two["speedup"] / two["speedup_bound"]
    )
