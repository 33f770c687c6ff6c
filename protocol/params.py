"""CKKS parameter sets, validated against the 128-bit HE standard.

The bounds on log2(q·p) for classical 128-bit security are from the
HomomorphicEncryption.org security standard (Albrecht et al., 2018), table for
uniform ternary secrets: N=4096 → 109, 8192 → 218, 16384 → 438, 32768 → 881.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import ConfigError

HE_STANDARD_128_BITS: dict[int, int] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: bits between the scale's precision and the grid participants round to
ENCRYPT_GRID_HEADROOM_BITS = 13


@dataclass(frozen=True)
class ParamSet:
    """One CKKS parameter set (docs/design.md#ckks-parameter-sets)."""

    id: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    note: str = ""

    @property
    def slots(self) -> int:
        """Number of CKKS slots per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Multiplicative depth: data primes between the first and the special one."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def total_bits(self) -> int:
        """log2 of the full modulus q·p."""
        return sum(self.coeff_mod_bit_sizes)

    @property
    def scale(self) -> float:
        """The nominal CKKS scale Δ."""
        return float(2**self.scale_bits)

    @property
    def encrypt_grid(self) -> float:
        """Participants round every value to a multiple of this before they
        encrypt it: 2^(13 − scale bits), 2^-22 ≈ 2.4e-7 at 8k-35x3, 3.7× the rms
        error of one decryption (6.4e-8), so a refreshed value keeps the
        decryption's error in about one slot in five instead of in every slot. A
        coarser grid costs fidelity: the refreshed state of the encrypted run
        then rounds differently from the twin's (docs/threat-model.md)."""
        return 2.0 ** (ENCRYPT_GRID_HEADROOM_BITS - self.scale_bits)

    @property
    def max_mask_bits(self) -> int:
        """Largest refresh mask ±2^b that fits the bottom level.

        The masked state is sent at the bottom level, whose modulus is the first
        prime alone: (state + mask)·Δ must stay below half of it for any slot
        values, so b ≤ bits(q0) − scale bits − 2 (one bit for the sign, one for
        the state beside the mask). 23 at 8k-35x3, 8 at 16k-50x6.
        """
        return self.coeff_mod_bit_sizes[0] - self.scale_bits - 2

    def validate(self) -> None:
        """Raise :class:`ConfigError` unless the set is 128-bit secure and sane."""
        bound = HE_STANDARD_128_BITS.get(self.poly_modulus_degree)
        if bound is None:
            raise ConfigError(
                f"parameter set {self.id!r}: N={self.poly_modulus_degree} is not in "
                f"the HE-standard table {sorted(HE_STANDARD_128_BITS)}"
            )
        if self.total_bits > bound:
            raise ConfigError(
                f"parameter set {self.id!r}: log2(q)={self.total_bits} exceeds the "
                f"128-bit bound {bound} for N={self.poly_modulus_degree}"
            )
        if self.depth < 1:
            raise ConfigError(f"parameter set {self.id!r}: needs at least one level")
        inner = self.coeff_mod_bit_sizes[1:-1]
        if any(b != self.scale_bits for b in inner):
            raise ConfigError(
                f"parameter set {self.id!r}: inner primes {inner} must equal the "
                f"scale bits {self.scale_bits} (rescaling drops one per level)"
            )


PARAM_SETS: dict[str, ParamSet] = {
    p.id: p
    for p in (
        ParamSet("8k-35x3", 8192, (60, 35, 35, 35, 53), 35, "default; depth 3"),
        ParamSet("16k-50x6", 16384, (60, 50, 50, 50, 50, 50, 50, 60), 50, "precise"),
        ParamSet("8k-40x2", 8192, (60, 40, 40, 60), 40, "aggregation only; depth 2"),
    )
}
DEFAULT_PARAM_SET = "8k-35x3"
HE_ADAM_DEPTH = 3


def get_param_set(name: str) -> ParamSet:
    """Return the validated parameter set ``name`` or raise :class:`ConfigError`."""
    try:
        ps = PARAM_SETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown parameter set {name!r}; known: {', '.join(PARAM_SETS)}"
        ) from None
    ps.validate()
    return ps
