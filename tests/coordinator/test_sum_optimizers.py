"""The baselines fedavg and fedavgm on the encrypted mean: the circuit against
the participants' float64 twin (protocol.adam.twin_step), with and without
dropouts, and V and r carried through unchanged in value."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.he_adam import OPTIMIZERS, ChunkState, StateUnits, initial_state
from protocol.adam import AdamHyper, max_step, twin_step
from protocol.backend import Ct
from tests.helpers import ckks_circuit_tol

HP = AdamHyper(lr=1.0, beta1=0.5)


def _inputs(ps, k: float, seed: int = 3):
    rng = np.random.default_rng(seed)
    n = ps.slots
    theta0 = rng.normal(0, 0.5, n)
    bound = 0.1
    # what K' of K replies sum to: w·clip(Δ, ±G) per reply, K' = K/k of them
    x = np.clip(rng.normal(0, 0.05, n), -bound, bound) / k
    m = rng.normal(0, 0.01, n)
    _, v, r = initial_state(rng.uniform(0, 0.2, n), HP)
    return theta0, x, m, v, r, bound


@pytest.mark.parametrize("k", [1.0, 4 / 3])
@pytest.mark.parametrize("optimizer", ["fedavg", "fedavgm"])
def test_sum_step_matches_the_twin(optimizer, k, ckks_pair, plain, ps):
    """Encrypted θ' within the circuit tolerance of twin_step (relative to the
    movement); m' as the twin keeps it; V and r unchanged; the plaintext
    backend equal to the twin to float64 rounding; the move within max_step."""
    part, coord, _, _ = ckks_pair
    theta0, x, m, v, r, bound = _inputs(ps, k)
    t = 4
    ref_theta, (ref_m, _, _) = twin_step(theta0, (m, v, r), x, t, HP, k, optimizer)
    units = StateUnits.of(coord, HP)
    l_m, l_v, l_r = StateUnits.levels(ps.depth)

    def enc(values, f=1.0, level=ps.depth) -> Ct:
        c = coord.load(part.encrypt(f * values, level), level=level)
        return Ct(c.data, c.level, f)

    gf = coord.gradient_factor
    xc = enc(x * gf)
    xc.factor = gf
    f_m, f_v, f_r = units.inp
    st = ChunkState(
        coord.to_bottom(enc(theta0)), enc(m, f_m, l_m), enc(v, f_v, l_v), enc(r, f_r)
    )
    new = OPTIMIZERS[optimizer](coord, st, xc, t, HP, k)
    dec = part.decrypt_ct(coord.to_bottom(new.theta))
    moved = np.max(np.abs(ref_theta - theta0))
    assert np.max(np.abs(dec - ref_theta)) / moved < ckks_circuit_tol(ps)
    out = units.out
    for got, want, f, name in (
        (new.m, ref_m, out[0], "m"),
        (new.V, v, out[1], "V"),
        (new.r, r, out[2], "r"),
    ):
        assert abs(got.factor / f - 1) < 1e-9, name  # what the refresher expects
        val = part.decrypt_ct(got)
        assert np.max(np.abs(val - want)) < 1e-4 * np.max(np.abs(want)), name

    fp = StateUnits.of(plain, HP).inp
    pst = ChunkState(
        Ct(theta0, 0), *(Ct(f * a, 3, f) for f, a in zip(fp, (m, v, r), strict=True))
    )
    pnew = OPTIMIZERS[optimizer](plain, pst, Ct(x, 3), t, HP, k)
    np.testing.assert_allclose(pnew.theta.data, ref_theta, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        pnew.m.data / pnew.m.factor, ref_m, rtol=1e-12, atol=1e-14
    )
    momentum_bound = max_step(optimizer, HP, bound)
    assert np.max(np.abs(ref_theta - theta0)) <= momentum_bound + 1e-12


def test_fedavg_at_lr_1_is_fedavg():
    """fedavg at lr 1 moves θ by exactly the (dropout-weighted) mean update."""
    theta = np.array([1.0, -2.0, 0.5])
    x = np.array([0.01, -0.02, 0.0])  # Σ w·clip(Δ) of 2 of 4 replies
    state = (np.zeros(3), np.ones(3), np.ones(3))
    new, _ = twin_step(theta, state, x, 7, AdamHyper(lr=1.0), 2.0, "fedavg")
    np.testing.assert_allclose(new, theta - 2.0 * x, rtol=0, atol=1e-15)


def test_fedavgm_is_server_momentum():
    """fedavgm: M' = β1·M + x, θ' = θ − lr·M', over a few steps."""
    hp = AdamHyper(lr=0.5, beta1=0.7)
    rng = np.random.default_rng(0)
    theta, mom = rng.normal(size=5), np.zeros(5)
    state = (np.zeros(5), np.ones(5), np.ones(5))
    ref = theta.copy()
    for t in range(1, 6):
        x = rng.normal(0, 0.01, 5)
        theta, state = twin_step(theta, state, x, t, hp, 1.0, "fedavgm")
        mom = hp.beta1 * mom + x
        ref = ref - hp.lr * mom
    np.testing.assert_allclose(theta, ref, rtol=1e-12, atol=1e-15)
