"""hedrl-bench at P = 12288 (three full ciphertexts): JSON schema and byte targets.

Bytes are deterministic up to the zstd compression of SEAL's serialisation
(±0.1 %), so the targets of issue 5 are asserted; times are not.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.bench import STAGES, main, parse_count, parse_list
from coordinator.he_adam import ChunkState, step
from coordinator.workers import ChunkPool
from protocol.adam import AdamHyper
from protocol.backend import Ct
from protocol.errors import SecretKeyRefused
from protocol.keys import generate

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
}


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
        ChunkPool(context=sec, param_set=ps.id, backend="ckks", workers=1)


def test_pool_step_equals_in_process_step(ps, plain):
    """Sharded over 2 workers, the twin's HE-Adam step is bit-for-bit the same."""
    _, pub, _ = generate(ps, "plain")
    rng = np.random.default_rng(0)
    hp = AdamHyper()
    n = 3

    def ct(level, lo=-1.0, hi=1.0):
        return Ct(rng.uniform(lo, hi, ps.slots), level)

    top = ps.depth
    states = [
        ChunkState(ct(0), ct(top), ct(top, 0.01, 0.1), ct(top, 3.0, 10.0))
        for _ in range(n)
    ]
    xs = [ct(top, -0.03, 0.03) for _ in range(n)]
    want = step(plain, states, xs, 5, hp)
    with ChunkPool(context=pub, param_set=ps.id, backend="plain", workers=2) as pool:
        got = pool.step_cts(states, xs, 5, hp)
    for g, w in zip(got, want, strict=True):
        for name in ("theta", "m", "V", "r"):
            a, b = getattr(g, name), getattr(w, name)
            assert a.level == b.level and a.factor == b.factor
            np.testing.assert_array_equal(a.data, b.data)
