"""A fidelity sweep runs what is missing, skips what is done, re-runs what a
preset change made stale (no CKKS here: the closed-loop runs are replaced by a
stub that records what would run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import fidelity


def _stub(calls: list[tuple[str, int, str]], fail: bool = False):
    def run_one(env, seed, variant, work, *, max_rounds=None, extra=None):
        calls.append((env, seed, variant))
        if fail:
            raise RuntimeError("run crashed")
        return {
            "env": env,
            "seed": seed,
            "variant": variant,
            "final_return": 1.0,
            "rounds_to_solve": None,
            "wall_s": 0.0,
            "_traces": {"theta": np.zeros(2)},
            "preset": fidelity.load_preset(env, extra)[0],
        }

    return run_one


def test_sweep_skips_done_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, str]] = []
    monkeypatch.setattr(fidelity, "run_one", _stub(calls))
    fidelity.sweep(["cartpole"], [0, 1], ["plain"], tmp_path, None)
    assert calls == [("cartpole", 0, "plain"), ("cartpole", 1, "plain")]
    assert fidelity.result_path(tmp_path, "cartpole", "plain", 0).exists()
    # a second sweep finds both finished
    fidelity.sweep(["cartpole"], [0, 1], ["plain"], tmp_path, None)
    assert len(calls) == 2


def test_crashed_run_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, str]] = []
    monkeypatch.setattr(fidelity, "run_one", _stub(calls, fail=True))
    with pytest.raises(RuntimeError, match="run crashed"):
        fidelity.sweep(["cartpole"], [0], ["ckks"], tmp_path, None)
    path = fidelity.result_path(tmp_path, "cartpole", "ckks", 0)
    assert not path.exists()


def test_sweep_reruns_results_of_an_older_preset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, str]] = []
    monkeypatch.setattr(fidelity, "run_one", _stub(calls))
    fidelity.sweep(["cartpole"], [0], ["plain"], tmp_path, None)
    path = fidelity.result_path(tmp_path, "cartpole", "plain", 0)
    res = json.loads(path.read_text())
    res["preset"] = {**res["preset"], "lr": 1.0}  # made before a re-tune
    path.write_text(json.dumps(res))
    fidelity.sweep(["cartpole"], [0], ["plain"], tmp_path, None)
    assert calls == [("cartpole", 0, "plain")] * 2
    assert json.loads(path.read_text())["preset"] == fidelity.load_preset("cartpole")[0]


def test_set_overrides_are_recorded_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--set values reach the run and its record; a run of the plain preset is
    stale for a --set sweep (and vice versa); unknown keys are refused."""
    extra = fidelity.parse_set(
        ["lr=5e-4", "layer-bounds=critic=0.01", "anneal-lr=true"]
    )
    assert extra == {"lr": 5e-4, "layer-bounds": "critic=0.01", "anneal-lr": True}
    calls: list[tuple[str, int, str]] = []
    monkeypatch.setattr(fidelity, "run_one", _stub(calls))
    fidelity.sweep(["cartpole"], [0], ["plain"], tmp_path, None)
    path = fidelity.result_path(tmp_path, "cartpole", "plain", 0)
    assert fidelity.stale(path, "cartpole") is None
    assert "lr" in fidelity.stale(path, "cartpole", extra)
    fidelity.sweep(["cartpole"], [0], ["plain"], tmp_path, None, extra)
    assert len(calls) == 2  # re-run with the overrides
    used = json.loads(path.read_text())["preset"]
    assert used["lr"] == 5e-4 and used["layer-bounds"] == "critic=0.01"
    assert "layer-bounds" in fidelity.stale(path, "cartpole")  # not the preset
    with pytest.raises(ValueError, match="run-config-key=value"):
        fidelity.parse_set(["learning-rate=0.1"])
    with pytest.raises(ValueError, match="run-config-key=value"):
        fidelity.parse_set(["lr"])
    with pytest.raises(ValueError, match="--set seed: set by the benchmark"):
        fidelity.parse_set(["seed=3"])


def test_set_refuses_the_committed_results(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        fidelity.main(["--envs", "cartpole", "--set", "lr=0.1"])
    assert "screening runs: give --out DIR" in capsys.readouterr().err


_SLOW_SWEEP = """
import sys, time
from benchmarks import fidelity
def run_one(env, seed, variant, work, **kw):
    work.mkdir(parents=True)
    (work / "checkpoint.npz").write_bytes(b"x")
    print(work, flush=True)
    time.sleep(120)
fidelity.run_one = run_one
sys.exit(fidelity.main(["--envs", "cartpole", "--seed-list", "0",
                        "--variants", "plain", "--out", sys.argv[1]]))
"""


def test_sigterm_keeps_checkpoints(tmp_path: Path) -> None:
    """`kill` on a sweep mid-run leaves no result; the run's work directory
    (its checkpoints, for a later resume) stays."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SWEEP, str(tmp_path)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        work = Path(proc.stdout.readline().strip())  # the run has started
        path = fidelity.result_path(tmp_path, "cartpole", "plain", 0)
        assert work.is_dir()
        proc.terminate()
        assert proc.wait(timeout=30) == 128 + 15
    finally:
        proc.kill()
    assert work == fidelity.work_path(tmp_path, "cartpole", "plain", 0)
    assert (work / "checkpoint.npz").exists()
    assert not path.exists()
