"""The coordinator's round loop with real participants in-process (no Ray).

These prove the keyless-coordinator guarantees on the real code path and that
the encrypted run tracks the plaintext twin while their rollouts coincide.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.local_grid import LocalGrid
from coordinator.chunks import STEP_STAGES
from coordinator.federation import Federation
from participants.learner import Learner
from protocol import keys
from protocol import messages as msg
from protocol.config import RunConfig
from protocol.errors import FingerprintMismatch, KeyMaterialError, SecretKeyRefused
from protocol.params import get_param_set
from protocol.records import read_header
from tests.helpers import (
    decrypt_theta,
    local_federation,
    local_key_file,
    local_raw,
    metrics_rows,
)

RUN_ID = 4242


def _config(tmp_path: Path, backend: str, **extra) -> dict:
    """3 participants, 4 rounds, seed 3, named after the backend."""
    return local_raw(
        tmp_path,
        **{
            "backend": backend,
            "num-rounds": 4,
            "num-participants": 3,
            "seed": 3,
            "run-name": backend,
            "checkpoint-every": 2,
            **extra,
        },
    )


def _run(tmp_path: Path, backend: str, **grid_kw) -> tuple[Federation, LocalGrid]:
    fed = local_federation(_config(tmp_path, backend), RUN_ID, **grid_kw)
    fed.run()
    return fed, fed.grid


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One encrypted and one plaintext-twin run of 4 rounds with the same seeds."""
    tmp = tmp_path_factory.mktemp("fed")
    out = {}
    for backend in ("ckks", "plain"):
        fed, grid = _run(tmp / backend, backend)
        out[backend] = (
            fed,
            grid,
            decrypt_theta(fed, local_key_file(tmp / backend, RUN_ID), backend),
            tmp / backend,
        )
    return out


def test_coordinator_never_holds_a_secret_key(runs):
    """After a full run the coordinator's context is public and cannot decrypt."""
    fed, grid, _, tmp = runs["ckks"]
    assert not fed.be.ctx.is_private() and not fed.be.ctx.has_secret_key()
    with pytest.raises(ValueError, match="Secret key"):
        fed.be.ctx.secret_key()  # TenSEAL itself has none to hand out
    with pytest.raises(KeyMaterialError, match="participant's context"):
        fed.be.decrypt_ct(fed.theta[0])
    # nothing under the coordinator's results directory holds key material
    assert {p.name for p in fed.out_dir.iterdir()} == {
        "metrics.jsonl",
        "summary.json",
        "checkpoint.npz",
        "ledger.jsonl",
        "learning_curve.png",
    }
    # the ledger names updates by digest only: nothing but JSON of ints,
    # floats and 64-hex-digit strings
    for line in (fed.out_dir / "ledger.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert set(record) <= {"step", "wire", "parent", "k", "updates", "init"} or (
            set(record) == {"final", "head"}
        )


def test_participants_never_send_decrypted_values(runs):
    """Every reply carries only ciphertext vectors, headers and env counts."""
    _, grid, _, _ = runs["ckks"]
    allowed_metrics = {"episodes", "return-sum", "env-steps"} | {
        msg.stage_time_key(k) for k in msg.PARTICIPANT_STAGES
    }
    for reply in grid.received:
        for key, record in reply.content.items():
            if key == "metrics":
                assert set(record) == allowed_metrics
            elif key == "setup":
                assert set(record) <= {
                    "fingerprint",
                    "layout-digest",
                    "param-count",
                    "participant-index",
                    "context",
                    "last-round",
                    "max-rounds",
                    "twin-step",
                    "twin-hash",
                }
            elif key == msg.RELAY_UP:  # the update sealed (AES-GCM) for key holders
                (sealed,) = record.values()
                assert set(record) == {"sealed"} and sealed[12:14] != b"PK"  # no npz
            elif key == "final":  # a tag on the final θ's ciphertext bytes
                assert set(record) in ({"tag", "participant-index"}, {"confirmed"})
            elif key.endswith(".hdr"):
                assert set(record) == {"header"}
            else:  # a vector: raw chunk bytes and their uint32 lengths, nothing else
                assert set(record) == {"data", "lengths"}
                assert (record["data"].stype, record["data"].dtype) == ("raw", "uint8")
                lengths = record["lengths"]
                assert (lengths.stype, lengths.dtype) == ("raw", "uint32")


def test_state_travels_where_the_step_uses_it(runs):
    """The refresher returns m and V one level below the top and r at the top
    (StateUnits.levels), so m's and V's chunks are ~3/4 of r's (3 of 4 primes);
    round 1's key holder sends m0, V0, r0 at the same levels."""
    fed, grid, _, _ = runs["ckks"]
    top = fed.be.top_level
    for kind in ("refresh", "v0"):
        replies = [r for r in grid.received if msg.state_key(kind, "r") in r.content]
        assert replies, f"no {kind} reply"
        for reply in replies:
            levels, sizes = [], []
            for name in msg.STATE_NAMES:
                key = msg.state_key(kind, name)
                levels.append(read_header(reply.content, key).level)
                sizes.append(
                    sum(len(bytes(a.data)) for a in reply.content[key].values())
                )
            assert levels == [top - 1, top - 1, top], (kind, levels)
            assert max(sizes[:2]) < 0.8 * sizes[2], (kind, sizes)


def test_every_ciphertext_has_scale_exactly_delta(runs):
    """Every chunk hedrl produced in a run — θ, gradients, squares, masked
    state, refresh, v0 on the wire and θ, m, V, r in the checkpoint — passes
    the exact checks a receiver applies (CkksBackend.check: scale exactly Δ
    among them), at the level its header or the checkpoint names."""
    from protocol.checkpoint import read_checkpoint
    from protocol.records import read_vector
    from protocol.wire import Expect

    fed, grid, _, _ = runs["ckks"]
    kinds, count = set(), 0
    for message in [*grid.sent, *grid.received]:
        if message.has_error():
            continue
        for key in message.content:
            if not key.endswith(".hdr"):
                continue
            name = key[: -len(".hdr")]
            hdr = read_header(message.content, name)
            fields = {f: getattr(hdr, f) for f in Expect.__dataclass_fields__}
            _, chunks = read_vector(message.content, name, Expect(**fields))
            for chunk in chunks:
                ct = fed.be.load(chunk, level=hdr.level)
                assert ct.data.scale == fed.params.scale
                count += 1
            kinds.add(hdr.kind)
    assert kinds == {"theta", "gradient", "squares", "state", "refresh", "v0"}
    meta, vectors = read_checkpoint(fed.out_dir / "checkpoint.npz")
    for name, chunks in vectors.items():
        for chunk in chunks:
            fed.be.load(chunk, level=int(meta["levels"][name]))
            count += 1
    assert set(vectors) == {"theta", *msg.STATE_NAMES} and count > 100


def test_encrypted_run_tracks_plaintext_twin(runs):
    """Same seeds, 4 rounds on one rollout: decrypted θ matches the twin's closely."""
    theta_c = runs["ckks"][2]
    theta_p = runs["plain"][2]
    theta0 = Learner(
        RunConfig.from_mapping(_config(Path("/"), "plain")), 0
    ).initial_theta()
    rel = np.max(np.abs(theta_c - theta_p)) / np.max(np.abs(theta_p - theta0))
    assert np.max(np.abs(theta_p - theta0)) > 1e-3  # it learned something
    assert rel < 1e-2, rel


def test_metrics_schema_and_bytes(runs):
    """metrics.jsonl has the required fields; upload ≈ 49.5 bytes per filled slot."""
    fed, _, _, _ = runs["ckks"]
    rows = metrics_rows(fed)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all(
        r["participants"] == 3 and r["missing"] == [] and r["stepped"] for r in rows
    )
    assert rows[0]["episodes"] > 0 and rows[0]["return_mean"] is not None
    assert rows[1]["return_mean"] is None and rows[1]["episodes"] == 0
    summary = json.loads((fed.out_dir / "summary.json").read_text())
    assert 45 < summary["upload_bytes_per_slot"] < 55
    for r in rows[1:]:  # round 1 builds the state from V0 instead of a refresh
        assert all(r[f"time/{k}"] > 0 for k in STEP_STAGES), r
        assert r["time/prepare_s"] + r["time/exchange_s"] <= r["round_s"]
        assert r["spare_refresher"] is None
    # participant-side breakdown: no refresher in round 1 (no state yet), one after
    assert rows[0]["participant/refresh_s"] == 0.0
    for r in rows:
        stages = [r[f"participant/{k}_s"] for k in msg.PARTICIPANT_STAGES]
        assert all(v >= 0 for v in stages) and r["participant/encrypt_s"] > 0, r
        assert max(stages) <= r["participant/busy_s"] <= r["participant/total_s"]
        # the in-process grid runs the handlers one after another
        assert r["participant/total_s"] <= r["time/exchange_s"], r
    assert all(r["participant/refresh_s"] > 0 for r in rows[1:])


def test_coordinator_refuses_secret_context_from_participant(tmp_path, monkeypatch):
    """If a participant hands over its secret context, setup fails: SecretKeyRefused."""

    def leak(path, params, backend):
        return Path(path).read_bytes()

    monkeypatch.setattr(keys, "evaluation_context", leak)
    with pytest.raises(SecretKeyRefused, match="holds a secret key"):
        _run(tmp_path, "ckks")


def test_fingerprint_mismatch_refused_at_setup(tmp_path):
    """A participant holding another key is named in a FingerprintMismatch."""
    other = tmp_path / "other"
    keys.write_keys(other, get_param_set("8k-35x3"), "ckks", force=False)
    with pytest.raises(FingerprintMismatch, match="participant 1002"):
        _run(
            tmp_path,
            "ckks",
            node_configs={
                2: {
                    "secret-context": str(other / "participant.ctx"),
                    "state-dir": str(tmp_path / "state-2"),
                    "federation-size": 3,
                }
            },
        )


def test_fingerprint_expected_by_operator_enforced(tmp_path):
    """expect-fingerprint: a context whose key is not the provisioned one is refused."""
    raw = _config(tmp_path, "plain", **{"expect-fingerprint": "ab" * 32})
    fed = local_federation(raw, RUN_ID)
    with pytest.raises(FingerprintMismatch, match="expect-fingerprint"):
        fed.setup()
