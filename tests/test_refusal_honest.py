"""Honest runs cost no refusal: every preset, both optimizers, the step bound.

A participant refuses a θ that moved further than its step bound; an honest
coordinator must never be refused, or runs would end on a spent budget. The
step bound a participant derives in simulation is 1.25 × the largest step
Adam's constants allow (:func:`protocol.adam.step_sup`); here every preset's
first rounds (where Adam's steps are largest) run on the plaintext twin and
the largest step seen is compared with both.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from coordinator.he_adam import exact_adam
from participants.trust import AUTO_BOUND_MARGIN
from protocol.adam import AdamHyper, step_sup
from tests.helpers import local_federation, local_raw

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(REPO.glob("benchmarks/presets/*.toml")) + sorted(
    REPO.glob("deploy/presets/*.toml")
)
ROUNDS = 30


def _preset(path: Path) -> dict:
    raw = tomllib.loads(path.read_text())
    for key in ("num-rounds", "stop-return"):
        raw.pop(key, None)
    # the bound concerns the server optimiser's settings, not the rollout's or
    # the local updates' size: the large rollouts (LunarLander's 8 × 512,
    # MountainCar's 4 × 256) are cut to 2 × 128 and LunarLander's 64 local
    # minibatches to 8, so that every preset's 30 rounds stay cheap
    raw["num-envs"] = min(raw.get("num-envs", 4), 2)
    raw["num-steps"] = min(raw.get("num-steps", 128), 128)
    if "num-minibatches" in raw:
        raw["num-minibatches"] = min(raw["num-minibatches"], 8)
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["he-adam", "exact-adam"])
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_refusal_none_in_honest_runs(tmp_path, preset, optimizer):
    """30 rounds of 4 participants: no refusal, every θ within the bound."""
    raw = local_raw(
        tmp_path,
        **{
            **_preset(preset),
            "backend": "plain",
            "optimizer": optimizer,
            "num-rounds": ROUNDS,
            "num-participants": 4,
            "seed": 1,
            "coordinator-workers": 0,
        },
    )
    steps: list[float] = []
    last: dict[str, np.ndarray] = {}

    def on_round(t, fed):
        th = np.concatenate(
            [fed.be.load(fed.be.to_bytes(c), level=0).data for c in fed.theta]
        )
        if "theta" in last:
            steps.append(float(np.max(np.abs(th - last["theta"]))))
        last["theta"] = th

    fed = local_federation(raw, 600, on_round=on_round, keep_history=False)
    summary = fed.run()
    assert all(r["refused"] == [] and r["rejected"] == {} for r in fed.history)
    assert summary["final"]["tagged"] == 4
    lr = fed.cfg.lr
    sup = step_sup(fed.cfg.hyper)
    assert max(steps) <= sup * lr, (max(steps) / lr, sup)
    assert AUTO_BOUND_MARGIN * sup * lr >= 1.25 * max(steps)


def test_step_sup_bounds_adam_and_is_reached():
    """No clipped gradient sequence moves exact Adam further than step_sup·lr;
    the worst sequence step_sup describes comes within 2 % of it."""
    hp = AdamHyper()
    sup = step_sup(hp)
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(200):
        t = int(rng.integers(1, 40))
        g = np.clip(rng.standard_t(1, size=(t, 64)) * rng.uniform(0, 2), -1, 1)
        v0 = g[0] ** 2 + hp.delta
        before = exact_adam(np.zeros(64), list(g[:-1]), v0, hp)
        after = exact_adam(np.zeros(64), list(g), v0, hp)
        worst = max(worst, float(np.max(np.abs(after - before))) / hp.lr)
    assert worst <= sup, (worst, sup)
    # the maximiser: a zero gradient (v0 = δ), then g = 1 three times
    g = [np.zeros(1), np.full(1, 1.0), np.full(1, 1.0), np.full(1, 1.0)]
    v0 = np.full(1, hp.delta)
    step = abs(
        exact_adam(np.zeros(1), g, v0, hp) - exact_adam(np.zeros(1), g[:2], v0, hp)
    )[0]
    assert step / hp.lr >= 0.98 * sup, (step / hp.lr, sup)
