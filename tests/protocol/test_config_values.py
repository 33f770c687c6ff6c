"""RunConfig refuses at start every value a run could not use, one line each:
what the coordinator's side could set to make a participant loop, overflow or
divide by zero (the delta-mode audit's finding 3)."""

from __future__ import annotations

import pytest

from protocol.config import MAX_MINIBATCHES, RunConfig
from protocol.errors import ConfigError


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", float("inf"), "lr: must be finite, received inf"),
        ("local-lr", float("nan"), "local-lr: must be finite, received nan"),
        ("clip-bound", float("inf"), "clip-bound: must be finite, received inf"),
        ("adam-floor", 5e-324, "adam-floor: must be 0 or in [1e-9, 1e6]"),
        ("adam-floor", 1e300, "adam-floor: must be 0 or in [1e-9, 1e6]"),
        ("beta2", 5e-324, "beta2: must be in (0.5, 0.99999], received 5e-324"),
        ("beta1", 1 - 2**-53, "beta1: must be in (0, 0.999]"),
        ("beta1", 0.0, "beta1: must be in (0, 0.999], received 0.0"),
        ("update-epochs", 10**6, f"at most {MAX_MINIBATCHES}, received 1000000 × 2"),
        ("update-epochs", float("inf"), "'update-epochs': expected int, received inf"),
        ("optimizer", "sgd", "optimizer: expected one of ("),
        ("participant-update", "avg", "participant-update: expected one of"),
    ],
)
def test_impossible_values_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({key: value})
    assert message in str(err.value)


def test_mode_defaults_fill_only_what_is_left_unset():
    """Gradient mode's defaults are PPO-FedSGD's; delta mode's are its own;
    a value given is kept in either mode."""
    g = RunConfig()
    assert (g.lr, g.beta1, g.adam_floor, g.update_epochs, g.num_minibatches) == (
        2e-3,
        0.9,
        0.0,
        2,
        2,
    )
    d = RunConfig.from_mapping({"participant-update": "delta"})
    assert (d.lr, d.beta1, d.adam_floor, d.update_epochs, d.num_minibatches) == (
        0.2,
        0.2,
        1.0,
        4,
        4,
    )
    assert d.hyper.delta == pytest.approx(1.0)
    kept = RunConfig.from_mapping({"participant-update": "delta", "lr": 2e-3})
    assert kept.lr == 2e-3 and kept.beta1 == 0.2
