"""hidden-sizes: the policy's widths from the run config, checked at start."""

from __future__ import annotations

import pytest

from protocol.config import RunConfig
from protocol.errors import ConfigError
from tests.helpers import local_federation, local_raw


def _count(obs: int, out: int, hidden: list[int]) -> int:
    dims = [obs, *hidden, out]
    return sum(a * b + b for a, b in zip(dims, dims[1:], strict=False))


def test_a_smaller_network_trains_with_its_own_parameter_count(tmp_path, caplog):
    raw = local_raw(
        tmp_path,
        **{
            "backend": "plain",
            "num-rounds": 2,
            "num-participants": 2,
            "hidden-sizes": "32",
        },
    )
    fed = local_federation(raw, 77)
    fed.run()
    # CartPole: 4 observations, actor 2 logits, critic 1 value
    assert fed.param_count == _count(4, 2, [32]) + _count(4, 1, [32]) == 419
    assert f"{fed.param_count} parameters" in caplog.text


@pytest.mark.parametrize(
    "bad", ["", "64,", "0", "513", "64,64,64,64", "a,b", "-4", "64,٦٤", "64," * 20]
)
def test_impossible_widths_are_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match="hidden-sizes: expected 1-3"):
        RunConfig.from_mapping({"hidden-sizes": bad})


def test_the_default_is_64_64():
    assert RunConfig().hidden == (64, 64)
    assert RunConfig.from_mapping({"hidden-sizes": " 128 , 32,16"}).hidden == (
        128,
        32,
        16,
    )
