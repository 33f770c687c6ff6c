"""Shared test helpers: CKKS tolerances derived from the parameter set."""

from __future__ import annotations

import numpy as np

from protocol.params import ParamSet


def ckks_abs_tol(ps: ParamSet, magnitude: float = 1.0) -> float:
    """Absolute error bound for one fresh encrypt → decrypt of values ≤ magnitude.

    CKKS encoding rounds to 1/Δ and fresh noise is ≈ sqrt(N)·σ·few/Δ with σ=3.2,
    i.e. ≈ 2^(9+2+2)/Δ at N=8192; we allow 2^16/Δ (8× that) plus a relative
    2^-30 for the rounding of large values.
    """
    return 2.0**16 / ps.scale + magnitude * 2.0**-30


def ckks_circuit_tol(ps: ParamSet) -> float:
    """Relative θ-displacement error allowed after tens of HE-Adam steps.

    Each step multiplies values up to |r| ≈ δ^(−1/2) ≈ 32 three times, so noise of
    ≈ 2^16/Δ grows to ≈ 2^(16+15)/Δ in r at the bottom level; Newton is a
    contraction, so errors do not accumulate over steps. Relative to a θ
    displacement ~lr·steps that gives ≈ 2^(31−b)/(lr·steps) ~ 1e-4 at b = 35.
    """
    return 2.0 ** (31 - ps.scale_bits) / (2e-3 * 50) * 4


def assert_close(
    actual: np.ndarray, expected: np.ndarray, atol: float, what: str
) -> None:
    """Max-abs comparison with a message naming what was compared."""
    err = float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))))
    assert err <= atol, f"{what}: max abs error {err:.3e} > tolerance {atol:.3e}"
