"""Shared test helpers; tolerances come from protocol.tolerance (parameter set)."""

from __future__ import annotations

import numpy as np

from protocol.tolerance import ckks_abs_tol, ckks_theta_rel_tol


def ckks_circuit_tol(ps) -> float:  # noqa: ANN001
    """Relative θ-displacement tolerance of the HE-Adam circuit (parameter set)."""
    return ckks_theta_rel_tol(ps)


def assert_close(
    actual: np.ndarray, expected: np.ndarray, atol: float, what: str
) -> None:
    """Max-abs comparison with a message naming what was compared."""
    err = float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))))
    assert err <= atol, f"{what}: max abs error {err:.3e} > tolerance {atol:.3e}"


__all__ = ["assert_close", "ckks_abs_tol", "ckks_circuit_tol"]
