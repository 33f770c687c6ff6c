"""The fidelity report: paired gap, bootstrap interval, complete seeds, table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import fidelity, fidelity_common
from benchmarks.fidelity_report import late_return, summarise, table

FINALS = {  # env "toy": threshold 100, random 0 → scale 100
    "ckks": {0: 90.0, 1: 80.0, 2: 70.0},
    "plain": {0: 91.0, 1: 82.0},
    "exact": {0: 95.0, 1: 85.0},
}


TOY_PRESET = {"env-id": "Toy-v0", "lr": 0.001}


@pytest.fixture
def out(tmp_path, monkeypatch):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "toy.toml").write_text('env-id = "Toy-v0"\nlr = 0.001\n')
    targets = tmp_path / "targets.toml"
    targets.write_text(
        "[toy]\nsolve-threshold = 100.0\nrandom-return = 0.0\nmax-rounds = 10\n"
    )
    monkeypatch.setattr(fidelity_common, "PRESETS", presets)
    monkeypatch.setattr(fidelity_common, "TARGETS", targets)
    for variant, seeds in FINALS.items():
        d = tmp_path / "fidelity" / "toy"
        d.mkdir(parents=True, exist_ok=True)
        for seed, final in seeds.items():
            res = {
                "env": "toy",
                "env_id": "Toy-v0",
                "seed": seed,
                "variant": variant,
                "final_return": final,
                "rounds": 10,
                "rounds_to_solve": None if final < 80 else 7,
                "env_steps_to_solve": None,
                "wall_s": 1.0,
                "median_round_s": 0.1,
                "solve_threshold": 100.0,
                "random_return": 0.0,
                "preset": TOY_PRESET,
            }
            (d / f"{variant}-seed{seed}.json").write_text(json.dumps(res))
    return tmp_path


def test_gap_is_paired_over_common_seeds(out):
    """gap = |mean(ckks − ref)| over seeds both finished ÷ |threshold − random|."""
    e = summarise(out)["toy"]
    assert e["gap"] == pytest.approx(abs((90 - 95) + (80 - 85)) / 2 / 100)
    assert e["gap_twin"] == pytest.approx(abs((90 - 91) + (80 - 82)) / 2 / 100)
    lo, hi = e["gap_detail"]["ci95_diff"]
    assert lo <= e["gap_detail"]["mean_diff"] <= hi
    assert e["gap_detail"]["seeds"] == [0, 1]


def test_table_compares_complete_seeds_and_counts_the_rest(out):
    """Seed 2 has only a ckks run: it is left out of the row and counted."""
    summary = summarise(out)
    e = summary["toy"]
    assert e["complete_seeds"] == [0, 1]
    v = e["variants"]
    assert v["ckks"]["mean_final_return_complete"] == pytest.approx(85.0)
    assert v["ckks"]["mean_final_return"] == pytest.approx(80.0)  # all 3 seeds
    assert v["ckks"]["solved_complete"] == 2 and v["ckks"]["solved"] == 2
    row = table(summary).splitlines()[-1]
    assert row == (
        "| Toy-v0 | 2 | 85.0 / 86.5 / 90.0 | 2/2/2 | 0.050 | 0.015 "
        "| – / – / – | – | 1 |"
    )


def test_late_return_weights_episodes_after_the_midpoint():
    """Rounds ≤ rounds/2 and rounds without episodes do not count."""
    res = {"rounds": 10, "curve": [[2, 50.0, 10], [6, 80.0, 10], [8, 100.0, 30]]}
    assert late_return(res) == pytest.approx((80 * 10 + 100 * 30) / 40)
    assert late_return({"rounds": 10, "curve": [[3, 1.0, 5]]}) is None
    assert late_return({"rounds": 10}) is None  # results without a curve


def test_second_half_gap_is_paired_like_the_headline(out):
    """gap_late pairs the seeds' second-half returns, CKKS vs exact Adam."""
    late = {"ckks": {0: 60.0, 1: 70.0}, "exact": {0: 64.0, 1: 72.0}}
    for variant, seeds in late.items():
        for seed, value in seeds.items():
            path = out / "fidelity" / "toy" / f"{variant}-seed{seed}.json"
            res = json.loads(path.read_text())
            # first half at 0 would pull a plain mean down; the midpoint is 5
            res["curve"] = [[3, 0.0, 50], [7, value, 20], [9, value, 10]]
            path.write_text(json.dumps(res))
    e = summarise(out)["toy"]
    assert e["gap_late"] == pytest.approx(abs((60 - 64) + (70 - 72)) / 2 / 100)
    assert e["gap_late_detail"]["seeds"] == [0, 1]
    assert e["variants"]["ckks"]["mean_late_return_complete"] == pytest.approx(65.0)
    assert e["variants"]["ckks"]["per_seed"]["0"]["late_return"] == pytest.approx(60)
    assert e["gap"] == pytest.approx(0.05)  # the headline is unchanged


def test_runs_of_an_older_preset_are_left_out(out):
    """A result made before the preset was re-tuned does not enter the report."""
    path = out / "fidelity" / "toy" / "ckks-seed2.json"
    res = json.loads(path.read_text())
    res["preset"] = {**TOY_PRESET, "lr": 0.002}
    path.write_text(json.dumps(res))
    assert fidelity.stale(path, "toy") == "preset changed since: lr 0.002 -> 0.001"
    v = summarise(out)["toy"]["variants"]
    assert v["ckks"]["mean_final_return"] == pytest.approx(85.0)  # seeds 0, 1 only


def test_mean_curve_interpolates_onto_the_first_runs_rounds():
    from benchmarks.fidelity_report import mean_curve

    a = np.array([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
    b = np.array([[0.0, 2.0], [5.0, 4.0], [25.0, 44.0]])  # ends at round 25
    got = mean_curve([a, b, np.empty((0, 2))])
    # rounds of a up to 25; b interpolated linearly: 10 → 14, 20 → 34
    want = np.array([[0.0, 1.0], [10.0, 12.0], [20.0, 27.0]])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert mean_curve([]).shape == (0, 2)


def test_display_only_keys_leave_a_result_current(out, tmp_path):
    """solve-threshold and tensorboard change what a run shows, not what it
    learns: adding them to a preset keeps its results in the table."""
    presets = fidelity_common.PRESETS
    (presets / "toy.toml").write_text(
        'env-id = "Toy-v0"\nlr = 0.001\nsolve-threshold = 90.0\ntensorboard = true\n'
    )
    result = next((tmp_path / "fidelity" / "toy").glob("*.json"))
    assert fidelity_common.stale(result, "toy") is None
    (presets / "toy.toml").write_text('env-id = "Toy-v0"\nlr = 0.002\n')
    assert "lr 0.001 -> 0.002" in fidelity_common.stale(result, "toy")


def test_report_rewrites_only_its_own_folders_table(out, tmp_path, monkeypatch):
    """--report on a screening folder leaves docs/fidelity.md alone; on a
    committed folder it replaces that folder's table and no other."""
    from benchmarks import fidelity_report

    doc = tmp_path / "fidelity.md"
    text = (
        "<!-- fidelity-table:begin -->\nOLD GRADIENT\n<!-- fidelity-table:end -->\n"
        "<!-- fidelity-delta-table:begin -->\nOLD DELTA\n"
        "<!-- fidelity-delta-table:end -->\n"
    )
    doc.write_text(text)
    monkeypatch.setattr(fidelity_report, "README", doc)
    monkeypatch.setattr(fidelity_report, "plot", lambda *a: None)
    fidelity_report.main(out)
    assert doc.read_text() == text
    monkeypatch.setattr(fidelity_report, "TABLES", {out: "fidelity-delta-table"})
    fidelity_report.main(out)
    new = doc.read_text()
    assert "OLD GRADIENT" in new and "OLD DELTA" not in new
    assert "| Toy-v0 | 2 |" in new
