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
    to the update itself; it is largest after the first step and shrinks
    relative to the growing displacement afterwards (Newton's r-iteration is a
    contraction, so noise does not accumulate in r). CKKS noise in the slots
    grows like √N, so the bound is 2^(25−b)·√(N/8192): 9.8e-4 at 8k-35x3 and
    4.2e-8 at 16k-50x6. Largest values measured (open loop, replayed
    gradients, seed 0; ``python -m benchmarks.fidelity --quick`` and the same
    on LunarLander for 40 rounds): 8k-35x3 CartPole 2.6e-4, LunarLander 6.2e-4;
    16k-50x6 (mask-bits 8) CartPole 1.8e-8, LunarLander 3.8e-8 — 1.6× and 1.1×
    below the bound on LunarLander. Before 2026-11-28 the bound had no √N and
    claimed a 4× margin from CartPole alone; LunarLander at 16k-50x6 exceeded
    it (3.8e-8 > 3.0e-8).
    """
    return 2.0 ** (25 - ps.scale_bits) * (ps.poly_modulus_degree / 8192) ** 0.5
