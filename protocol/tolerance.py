"""CKKS error bounds derived from the parameter set (used by tests and benchmarks)."""

from __future__ import annotations

from protocol.params import ParamSet


def ckks_abs_tol(ps: ParamSet, magnitude: float = 1.0) -> float:
    """Absolute error bound for one fresh encrypt → decrypt of values ≤ magnitude.

    CKKS encoding rounds to 1/Δ and fresh noise is ≈ sqrt(N)·σ·few/Δ with σ=3.2,
    i.e. ≈ 2^(9+2+2)/Δ at N=8192 (measured: 2e-8 at Δ = 2^35); we allow 2^16/Δ
    (8× that) plus a relative 2^-30 for the rounding of large values.
    """
    return 2.0**16 / ps.scale + magnitude * 2.0**-30


def ckks_theta_rel_tol(ps: ParamSet) -> float:
    """Relative θ error of HE-Adam vs its float64 twin: max|Δθ| / max|θ_twin − θ0|.

    The error of one step is the noise of the bottom-level product nr·H relative
    to the update itself; it is largest after the first step (measured 2.6e-4 at
    b = 35 bits of scale, i.e. ≈ 2^(23−b)) and shrinks relative to the growing
    displacement afterwards (Newton's r-iteration is a contraction, so noise does
    not accumulate in r). Allowed: 2^(25−b), 4× the largest value measured —
    9.8e-4 at 8k-35x3 and 3.0e-8 at 16k-50x6.
    """
    return 2.0 ** (25 - ps.scale_bits)
