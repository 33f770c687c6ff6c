"""A fidelity run stopped mid-way resumes from its last checkpoint (real
CartPole federation, plaintext twin, in-process grid)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import fidelity, fidelity_common

# the sweep runner's resume paths, each a few short federations: CI runs them,
# the fast loop does not
pytestmark = pytest.mark.slow

EVERY, TRACE, ROUNDS, STOP = 10, 5, 30, 25


@pytest.fixture
def short(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (fidelity, fidelity_common):
        monkeypatch.setattr(module, "CHECKPOINT_EVERY", EVERY)
    monkeypatch.setattr(fidelity, "TRACE_ROUNDS", TRACE)


def _stopped_sweep(
    monkeypatch: pytest.MonkeyPatch, out: Path, rounds: int, stop: int
) -> None:
    """A sweep that gets Ctrl-C right after round ``stop`` (the sweep's SIGTERM
    handler raises too)."""
    orig = fidelity.ThetaTrace.__call__

    def call(self, t, fed):
        orig(self, t, fed)
        if t == stop:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(fidelity.ThetaTrace, "__call__", call)
        with pytest.raises(KeyboardInterrupt):
            fidelity.sweep(["cartpole"], [0], ["plain"], out, rounds)


def test_stopped_run_resumes_from_its_checkpoint(
    tmp_path: Path, short: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stopped_sweep(monkeypatch, tmp_path, ROUNDS, STOP)
    path = fidelity.result_path(tmp_path, "cartpole", "plain", 0)
    work = fidelity.work_path(tmp_path, "cartpole", "plain", 0)
    assert not path.exists()
    part = work / "results" / "part-0"
    # the checkpoint of round 20 holds θ_20, which the participants accepted
    # in round 20: step 19; rounds 20-25 are run again
    first = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in first] == list(range(1, STOP + 1))
    elapsed = json.loads((part / "elapsed.json").read_text())
    with open(part / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 26, "ret')  # a kill -9 in the middle of a line

    fidelity.sweep(["cartpole"], [0], ["plain"], tmp_path, ROUNDS)
    res = json.loads(path.read_text())
    assert res["resumed_at"] == [2 * EVERY]
    assert res["rounds"] == ROUNDS
    rounds = [c[0] for c in res["curve"]]
    assert rounds == sorted(set(rounds)) and rounds[-1] <= ROUNDS
    # the part before the checkpoint is the first run's, round for round
    kept = [
        [r["round"], r["return_mean"], r["episodes"]]
        for r in first
        if r["round"] < 2 * EVERY and r["episodes"]
    ]
    assert res["curve"][: len(kept)] == kept
    assert res["wall_s"] > elapsed[str(2 * EVERY - 1)]
    with np.load(fidelity.trace_path(tmp_path, "cartpole", "plain", 0)) as tr:
        assert tr["theta"].shape[0] == TRACE
    assert not work.exists()  # removed once the result is written


def test_work_of_other_settings_is_discarded(
    tmp_path: Path, short: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stopped_sweep(monkeypatch, tmp_path, ROUNDS, STOP)
    work = fidelity.work_path(tmp_path, "cartpole", "plain", 0)
    assert (work / "results" / "part-0" / "checkpoint.npz").exists()
    # another round budget: the stopped run does not fit, start over
    fidelity.sweep(["cartpole"], [0], ["plain"], tmp_path, ROUNDS + 5)
    res = json.loads(fidelity.result_path(tmp_path, "cartpole", "plain", 0).read_text())
    assert res["resumed_at"] == []
    assert res["rounds"] == ROUNDS + 5


def test_run_stopped_twice_resumes_twice(
    tmp_path: Path, short: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    rounds = 4 * EVERY
    for stop in (STOP, STOP + EVERY):  # after rounds 25 and 35
        _stopped_sweep(monkeypatch, tmp_path, rounds, stop)
    fidelity.sweep(["cartpole"], [0], ["plain"], tmp_path, rounds)
    res = json.loads(fidelity.result_path(tmp_path, "cartpole", "plain", 0).read_text())
    assert res["resumed_at"] == [2 * EVERY, 3 * EVERY]
    assert res["rounds"] == rounds
    rounds_seen = [c[0] for c in res["curve"]]
    assert rounds_seen == sorted(set(rounds_seen))
