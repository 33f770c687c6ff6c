"""Kill the coordinator's process mid-run; a new run resumes from the checkpoint.

In a Flower simulation the ServerApp runs inside the ``flwr-simulation`` process;
SIGKILL on it is the coordinator dying without any chance to clean up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from protocol.checkpoint import read_checkpoint
from tests.flwr_sim import REPO, flwr_cmd, flwr_env, pids_matching, stop_processes

ROUNDS, EVERY = 12, 4


@pytest.mark.slow
def test_restart_after_killing_serverapp_process(tmp_path):
    """Killed after ≥ 6 rounds; resumed from its last checkpoint to 12 rounds."""
    env, flwr_home = flwr_env(tmp_path)
    results = tmp_path / "results"
    base = {
        "backend": "ckks",
        "num-rounds": ROUNDS,
        "checkpoint-every": EVERY,
        "results-dir": str(results),
        "seed": 4,
    }
    first = subprocess.Popen(
        flwr_cmd({**base, "run-name": "first"}, 4),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        metrics = results / "first" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= EVERY + 2:
                break
            time.sleep(0.3)
        victims = pids_matching(flwr_home, b"flwr-simulation")
        assert victims, "no flwr-simulation process found to kill"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at = len(metrics.read_text().splitlines())
        first.wait(timeout=120)
        assert not (results / "first" / "summary.json").exists()
        assert EVERY + 2 <= killed_at < ROUNDS

        ckpt = results / "first" / "checkpoint.npz"
        # the round-k checkpoint holds θ_k, accepted by the participants in
        # round k, with the state after step k − 1
        step = read_checkpoint(ckpt)[0]["step"]
        assert step % EVERY == EVERY - 1 and step + 1 <= killed_at, step
        resumed = subprocess.run(
            flwr_cmd({**base, "run-name": "resumed", "resume-from": str(ckpt)}, 4),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        out = resumed.stdout + resumed.stderr
        rows = [
            json.loads(x)
            for x in (results / "resumed" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["round"] for r in rows] == list(range(step + 1, ROUNDS + 1)), out[
            -3000:
        ]
        assert all(
            r["stepped"] and r["participants"] == 4 and not r["rejected"] for r in rows
        )
        summary = json.loads((results / "resumed" / "summary.json").read_text())
        assert summary["rounds"] == ROUNDS
    finally:
        first.kill()
        stop_processes(flwr_home)
