"""Parameter sets: the table is 128-bit secure and bad names fail clearly."""

import pytest

from protocol.errors import ConfigError
from protocol.params import HE_STANDARD_128_BITS, PARAM_SETS, ParamSet, get_param_set


@pytest.mark.parametrize("name", ["8k-35x3", "16k-50x6", "8k-40x2"])
def test_param_sets_within_he_standard_bound(name):
    """Every shipped set validates and stays under the HE-standard log q bound."""
    ps = get_param_set(name)
    assert ps.total_bits <= HE_STANDARD_128_BITS[ps.poly_modulus_degree]
    assert ps.slots == ps.poly_modulus_degree // 2


def test_depths_match_architecture():
    """8k-35x3 has depth 3, 16k-50x6 depth 6, 8k-40x2 depth 2."""
    assert [PARAM_SETS[n].depth for n in ("8k-35x3", "16k-50x6", "8k-40x2")] == [
        3,
        6,
        2,
    ]


def test_insecure_param_set_rejected():
    """A modulus above the 128-bit bound is refused with the numbers in the message."""
    bad = ParamSet("bad", 8192, (60, 40, 40, 40, 60), 40)
    with pytest.raises(ConfigError, match="exceeds the 128-bit bound 218"):
        bad.validate()


def test_unknown_param_set_names_known_ones():
    """An unknown id lists the known ones."""
    with pytest.raises(ConfigError, match="unknown parameter set 'nope'.*8k-35x3"):
        get_param_set("nope")
