"""Per-layer clip bounds (run config ``layer-bounds``): resolution and clipping."""

from __future__ import annotations

import numpy as np
import pytest

from participants.learner import Learner, clip_and_scale, layer_bounds
from participants.policy import make_layout
from protocol.config import RunConfig
from protocol.errors import ConfigError

LAYOUT = make_layout(8, 4, False)  # LunarLander's actor-critic


def test_longest_prefix_wins_component_wise() -> None:
    rules = RunConfig(
        layer_bounds="actor=0.01, actor.1=1e-4,critic.2.bias=2"
    ).layer_bound_rules
    bounds = dict(zip(LAYOUT.names, layer_bounds(LAYOUT, 0.5, rules), strict=True))
    assert bounds["actor.0.weight"] == bounds["actor.2.bias"] == 0.01
    assert bounds["actor.1.weight"] == bounds["actor.1.bias"] == 1e-4
    assert bounds["critic.2.bias"] == 2.0
    assert bounds["critic.2.weight"] == bounds["critic.0.weight"] == 0.5


def test_prefix_is_not_a_string_prefix() -> None:
    """'actor.1' must not capture 'actor.10...'; 'act' matches nothing."""
    wide = make_layout(8, 4, False, hidden=tuple([4] * 11))
    rules = RunConfig(layer_bounds="actor.1=0.25").layer_bound_rules
    bounds = dict(zip(wide.names, layer_bounds(wide, 1.0, rules), strict=True))
    assert bounds["actor.1.weight"] == 0.25
    assert bounds["actor.10.weight"] == 1.0
    with pytest.raises(ConfigError, match=r"\['act'\] match no layer"):
        layer_bounds(LAYOUT, 1.0, RunConfig(layer_bounds="act=0.1").layer_bound_rules)


def test_clip_and_scale_per_layer_matches_reference() -> None:
    """Each tensor clipped to its own ±G and divided by it (float64 reference)."""
    rng = np.random.default_rng(3)
    grad = rng.standard_normal(LAYOUT.size) * 10.0 ** rng.uniform(-6, 0, LAYOUT.size)
    rules = RunConfig(layer_bounds="actor.1=1e-4,critic=0.03").layer_bound_rules
    bounds = layer_bounds(LAYOUT, 0.1, rules)
    out = clip_and_scale(grad, LAYOUT, bounds)
    for (name, sl), g in zip(LAYOUT.slices(), bounds, strict=True):
        want = np.minimum(np.maximum(grad[sl], -g), g) / g
        np.testing.assert_allclose(out[sl], want, rtol=1e-15, err_msg=name)
    assert np.max(np.abs(out)) <= 1.0
    # one scalar bound is the old behaviour
    np.testing.assert_array_equal(
        clip_and_scale(grad, LAYOUT, 0.1),
        clip_and_scale(grad, LAYOUT, (0.1,) * len(LAYOUT.names)),
    )


def test_learner_takes_bounds_from_run_config() -> None:
    cfg = RunConfig.from_mapping(
        {"env-id": "LunarLander-v3", "clip-bound": 0.2, "layer-bounds": "critic=0.05"}
    )
    bounds = dict(zip(LAYOUT.names, Learner(cfg, 0).bounds, strict=True))
    assert bounds["critic.1.weight"] == 0.05 and bounds["actor.1.weight"] == 0.2
    bad = RunConfig.from_mapping({"env-id": "CartPole-v1", "layer-bounds": "pi=0.1"})
    with pytest.raises(ConfigError, match="'pi'.*match no layer"):
        Learner(bad, 0)
