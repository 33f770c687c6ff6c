"""End to end: `flwr run .` trains CartPole with 4 participants, encrypted and plain.

Marked slow (still run in CI). Each run stops once the mean of the last 20
non-null per-round mean returns reaches 195, or fails after the round budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.flwr_sim import flwr_run

ROUND_BUDGET = 400


def _run(tmp_path: Path, backend: str) -> tuple[list[dict], dict, str]:
    results = tmp_path / "results"
    proc = flwr_run(
        tmp_path,
        {
            "backend": backend,
            "num-rounds": ROUND_BUDGET,
            "stop-return": 195.0,
            "results-dir": str(results),
            "run-name": "e2e",
            "seed": 1,
            "checkpoint-every": 100,
        },
    )
    out = proc.stdout + proc.stderr
    run_dir = results / "e2e"
    assert (run_dir / "summary.json").exists(), (
        f"no summary; flwr output:\n{out[-6000:]}"
    )
    rows = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    return rows, json.loads((run_dir / "summary.json").read_text()), out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ckks", "plain"])
def test_cartpole_federation_reaches_195(tmp_path, backend):
    """4 participants reach a mean return ≥ 195 within the round budget."""
    rows, summary, out = _run(tmp_path, backend)
    assert summary["backend"] == backend
    assert summary["final_return_mean_last20"] >= 195, (
        f"{backend}: last-20 mean {summary['final_return_mean_last20']} after "
        f"{summary['rounds']} rounds\n{out[-3000:]}"
    )
    assert summary["rounds"] <= ROUND_BUDGET
    assert all(r["participants"] == 4 and r["missing"] == [] for r in rows)
    assert all(r["refused"] == [] for r in rows)  # an honest run costs no budget
    assert summary["skipped_steps"] == 0
    # the run ends with the final θ every participant accepted and confirmed
    assert summary["final"]["tagged"] == 4 and len(summary["final"]["confirmed"]) == 4
    required = {
        "round",
        "backend",
        "return_mean",
        "episodes",
        "env_steps",
        "upload_bytes",
        "broadcast_bytes",
        "coordinator_s",
        "round_s",
        "participants",
        "missing",
    }
    assert all(required <= set(r) for r in rows)
    if backend == "ckks":
        # seeded symmetric upload: ~49.5 bytes per parameter (3 chunks of 4096 slots)
        per_param = summary["upload_bytes_per_param"]
        assert 40 < per_param < 80, per_param
        ckpt = Path(summary["checkpoint"])
        assert ckpt.exists()
        assert "participant" not in " ".join(p.name for p in ckpt.parent.iterdir())
