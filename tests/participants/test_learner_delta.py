"""'delta' mode: a rollout at θ and E×M local PPO updates; Δ = θ − θ_local."""

from __future__ import annotations

import numpy as np
import pytest

from participants.learner import Learner, LocalOptimizer
from protocol.config import RunConfig
from protocol.errors import ConfigError


def _cfg(**kw) -> RunConfig:
    return RunConfig.from_mapping({"backend": "plain", "seed": 5, **kw})


def _delta_and_gradient(**kw) -> tuple[np.ndarray, np.ndarray, dict]:
    """Δ of a delta-mode learner and the first gradient of a gradient-mode one,
    both at θ0 with one full-batch minibatch (E1·M1) on the same rollout."""
    one = {"update-epochs": 1, "num-minibatches": 1}
    delta_l = Learner(_cfg(**{"participant-update": "delta", **one, **kw}), 2)
    grad_l = Learner(_cfg(**one), 2)
    theta = delta_l.initial_theta()
    delta, stats, _ = delta_l.step(theta, None)
    grad, _, _ = grad_l.step(theta, None)
    return delta, grad, stats


def test_one_local_sgd_step_is_the_gradient_times_the_local_lr():
    """E1·M1 with local SGD: Δ = local-lr · g, g the gradient-mode learner's
    gradient on the same rollout (same seeds), to float64 rounding."""
    delta, grad, stats = _delta_and_gradient(**{"local-lr": 0.05})
    assert np.max(np.abs(grad)) > 1e-3
    np.testing.assert_allclose(delta, 0.05 * grad, rtol=1e-12, atol=1e-15)
    assert stats["env_steps"] == 4 * 128


def test_one_local_adam_step_is_the_lr_times_the_sign():
    """Adam's first bias-corrected step is lr·g/(|g| + ε): ±lr where |g| ≫ ε."""
    delta, grad, _ = _delta_and_gradient(
        **{"local-optimizer": "adam", "local-lr": 0.01}
    )
    big = np.abs(grad) > 1e-4
    np.testing.assert_allclose(delta[big], 0.01 * np.sign(grad[big]), rtol=1e-3)
    assert np.all(np.abs(delta) <= 0.01 + 1e-15)


def test_local_gradient_norm_is_capped():
    """local-grad-norm scales a gradient to that global norm (and only a larger one)."""
    cfg = _cfg(**{"local-grad-norm": 0.5, "local-lr": 1.0})
    opt = LocalOptimizer(cfg, 3)
    np.testing.assert_allclose(opt.step(np.array([3.0, 4.0, 0.0])), [0.3, 0.4, 0.0])
    np.testing.assert_allclose(opt.step(np.array([0.3, 0.0, 0.0])), [0.3, 0.0, 0.0])


def test_every_round_is_a_rollout_and_the_episodes_continue():
    """Each delta round collects num-envs × num-steps fresh steps, and the saved
    state carries the environments on (episodes finish across rounds)."""
    learner = Learner(_cfg(**{"participant-update": "delta"}), 0)
    theta, saved, steps, episodes = learner.initial_theta(), None, 0, 0
    for _ in range(3):
        delta, stats, saved = learner.step(theta, saved)
        theta = theta - delta
        steps += stats["env_steps"]
        episodes += stats["episodes"]
    assert steps == 3 * 4 * 128 and episodes > 0


@pytest.mark.parametrize(
    "key,value",
    [("participant-update", "avg"), ("local-optimizer", "rmsprop"), ("local-lr", 0)],
)
def test_delta_mode_keys_are_checked(key, value):
    with pytest.raises(ConfigError, match=key):
        _cfg(**{key: value})


def test_participant_refuses_a_run_config_its_bound_cannot_take(tmp_path):
    """Before decrypting anything and charging nothing, a participant refuses
    a run config whose honest steps exceed its own theta-step-bound, or that
    weights updates up (num-participants below its federation-size)."""
    from participants.trust import AUTO_BOUND_MARGIN, Trust, largest_step

    cfg = _cfg(**{"participant-update": "delta"})
    node = {
        "secret-context": str(tmp_path / "participant.ctx"),
        "participant-index": 0,
        "federation-size": 4,
        "theta-step-bound": 0.1,
    }
    trust = Trust.from_context(node, cfg, 1)
    assert largest_step(cfg) == pytest.approx(0.9973 * 0.2, rel=1e-3)
    with pytest.raises(ConfigError, match="theta-step-bound is 0.1: raise it"):
        trust.admit_run(cfg)
    Trust.from_context({**node, "theta-step-bound": 0.25}, cfg, 1).admit_run(cfg)
    few = _cfg(**{"participant-update": "delta", "num-participants": 3})
    with pytest.raises(ConfigError, match="num-participants 3 is below"):
        Trust.from_context({**node, "theta-step-bound": 0.25}, few, 1).admit_run(few)
    # simulation: the automatic bound takes every honest step with a margin
    sim = Trust.from_context({"partition-id": 0, "num-partitions": 4}, cfg, 1)
    assert sim.theta_step_bound == pytest.approx(AUTO_BOUND_MARGIN * largest_step(cfg))
    sim.admit_run(cfg)
