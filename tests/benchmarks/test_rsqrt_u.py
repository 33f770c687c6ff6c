"""benchmarks.rsqrt_u: u = x²r² statistics of a real twin run."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.rsqrt_u import UStats, measure
from protocol.adam import rsqrt_step_error


def test_window_statistics_against_numpy():
    rng = np.random.default_rng(0)
    steps = [rng.uniform(0, 1, 50) ** 3 for _ in range(5)]
    stats = UStats(window=3, constants=(3.0, 4.16))
    for t, u in enumerate(steps, start=1):
        stats.add(t, u)
    rows = stats.rows()
    assert [r["rounds"] for r in rows] == [[1, 3], [4, 6]]
    for row, part in zip(rows, (steps[:3], steps[3:]), strict=True):
        u = np.concatenate(part)
        assert row["max_u"] == u.max()
        assert row["share_u>0.3"] == pytest.approx((u > 0.3).mean())
        for a in (3.0, 4.16):
            want = rsqrt_step_error(a, u).mean()
            assert row[f"mean_err_A{a:g}"] == pytest.approx(want, rel=1e-12)
    assert rows[0]["mean_err_A3"] < 0 < rows[0]["mean_err_A4.16"]


@pytest.mark.slow
def test_cartpole_twin_keeps_u_below_u_max(tmp_path):
    """In a real CartPole twin run, clipped gradients give u ≤ u_max = 1 (what
    keeps r positive), and Newton's mean error is below 1e-3."""
    rows = measure("cartpole", rounds=6, seed=0, window=3, work=tmp_path)
    assert [r["rounds"] for r in rows] == [[1, 3], [4, 6]]
    for r in rows:
        assert 0 < r["max_u"] <= 1.0
        assert -1e-3 < r["mean_err_A3"] <= 0.0  # Newton from above lands below
