"""Participants keep their PPO diagnostics in their own state directory; the
coordinator's side never sees them."""

from __future__ import annotations

import json
import math

from participants.metrics import DIAGNOSTICS, diagnostics_path, write_diagnostics
from tests.helpers import local_federation, local_raw, metrics_rows


def test_each_participant_writes_its_diagnostics_and_sends_none(tmp_path):
    raw = local_raw(
        tmp_path,
        **{
            "backend": "plain",
            "participant-update": "delta",
            "num-rounds": 3,
            "num-participants": 3,
            "run-name": "diag",
        },
    )
    fed = local_federation(raw, 4242)
    fed.run()
    state_dir = tmp_path / "keys" / "run-4242"
    for index in range(3):
        path = diagnostics_path(state_dir, fed.fingerprint, index)
        assert path.stat().st_mode & 0o777 == 0o600
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2, 3]
        for r in rows:  # delta mode: a rollout and E×M updates every round
            assert r["env_steps"] == fed.cfg.num_envs * fed.cfg.num_steps
            assert set(DIAGNOSTICS) <= set(r) and all(
                math.isfinite(r[k]) for k in DIAGNOSTICS
            )
            assert r["entropy"] > 0 and 0 <= r["clipfrac"] <= 1
    # nothing of them in what the coordinator got or wrote
    for row in metrics_rows(fed):
        assert not [k for k in row if any(d in k for d in DIAGNOSTICS)], row
    for path in fed.out_dir.iterdir():
        if path.suffix in (".json", ".jsonl"):
            text = path.read_text()
            assert not any(
                f'"{d}"' in text for d in ("pg_loss", "v_loss", "approx_kl")
            ), path


def test_a_diagnostics_file_that_cannot_be_written_is_not_fatal(tmp_path, caplog):
    missing = tmp_path / "missing" / "d.jsonl"
    write_diagnostics(missing, 0, 1, {"env_steps": 4, "episodes": 0})
    write_diagnostics(tmp_path / "d.jsonl", 0, 1, {"episodes": "many"})
    assert caplog.text.count("diagnostics not written") == 2
    path = diagnostics_path(tmp_path, "ab" * 32, 2)
    assert path.name == f"diagnostics-{'ab' * 8}-p2.jsonl"
    write_diagnostics(path, 2, 1, {})  # a replayed gradient source's bare stats
    nan = {"episodes": 1, "return_sum": float("inf"), "train/approx_kl": float("nan")}
    write_diagnostics(path, 2, 2, nan)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows[0] == {"round": 1, "env_steps": 0, "episodes": 0, "return_mean": None}
    assert rows[1]["return_mean"] is None and rows[1]["approx_kl"] is None
