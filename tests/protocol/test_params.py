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


@pytest.mark.parametrize("name", ["8k-35x3", "16k-50x6"])
def test_largest_allowed_mask_fits_the_bottom_level(name, tmp_path):
    """State + a mask of ±2^max_mask_bits in every slot (the worst case: a
    constant polynomial) encodes at the bottom level and decrypts back to the
    state (real CKKS; the refresher's path: masked on the coordinator,
    decrypted by a key holder)."""
    import numpy as np

    from protocol.keys import coordinator_backend, generate, participant_backend

    ps = get_param_set(name)
    sec, pub, _ = generate(ps, "ckks")
    (tmp_path / "p.ctx").write_bytes(sec)
    part, _ = participant_backend(tmp_path / "p.ctx", ps, "ckks")
    coord, _ = coordinator_backend(pub, ps, "ckks")
    rng = np.random.default_rng(0)
    state = rng.uniform(0.0, 40.0, ps.slots)  # r reaches ~1/√δ ≈ 32
    ct = coord.to_bottom(coord.load(part.encrypt(state), level=ps.depth))
    mask = np.full(ps.slots, 2.0**ps.max_mask_bits - 1.0)
    got = part.decrypt(coord.dump(coord.add_plain(ct, mask)), level=0) - mask
    # measured 2^-25.4 (8k-35x3) and 2^-39.7 (16k-50x6): 2^-(scale−20) stated
    np.testing.assert_allclose(got, state, atol=2.0 ** -(ps.scale_bits - 20))
    # and the bound is not loose: two bits more no longer encode
    too_big = np.full(ps.slots, 2.0 ** (ps.max_mask_bits + 2))
    with pytest.raises(ValueError, match="too large"):
        coord.add_plain(ct, too_big)
