"""HE-Adam: encrypted circuit vs float64 circuit vs exact Adam, and Newton safety.

Gradient generator (all tests): normalised gradients g ∈ [−1, 1] drawn
N(0, 0.3²) and clipped, with a full spike (g = ±1) on 100 slots every 10th
step and exact zeros on another 100 slots every 7th step. Metric: relative θ
displacement error max|θ_a − θ_b| / max|θ_b − θ_0|.
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.he_adam import (
    ChunkState,
    StateUnits,
    circuit_reference,
    exact_adam,
    initial_state,
    step_chunk,
)
from protocol.adam import AdamHyper, minimax_rsqrt_a, rsqrt_step_error
from protocol.backend import Backend, Ct, DepthExceeded
from tests.helpers import ckks_circuit_tol

HP = AdamHyper(lr=2e-3)
HP_A = AdamHyper(lr=2e-3, rsqrt_a=4.16)  # the minimax constant of r's update


def _grads(n: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for t in range(1, steps + 1):
        g = np.clip(rng.normal(0, 0.3, n), -1, 1)
        if t % 10 == 0:
            g[:100] = np.sign(rng.normal(size=100))
        if t % 7 == 0:
            g[100:200] = 0.0
        out.append(g)
    return out


def _rel(a: np.ndarray, b: np.ndarray, theta0: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b - theta0)))


def _plain_state(
    be: Backend, hp: AdamHyper, theta, m, v, r, level: int = 3
) -> ChunkState:
    """A twin's step input: θ at the bottom, m, V, r in ``StateUnits.inp``."""
    f = StateUnits.of(be, hp).inp
    mvr = (Ct(f[i] * a, level, f[i]) for i, a in enumerate((m, v, r)))
    return ChunkState(Ct(theta, 0), *mvr)


def _values(st: ChunkState) -> tuple[np.ndarray, ...]:
    """A twin's (θ, m, V, r) as values (data ÷ factor)."""
    return tuple(c.data / c.factor for c in (st.theta, st.m, st.V, st.r))


def _enc(part: Backend, coord: Backend, values: np.ndarray, f: float, level: int) -> Ct:
    """``f·values`` encrypted by ``part`` at ``level``, loaded by ``coord`` as a
    handle carrying factor ``f``."""
    c = coord.load(part.encrypt(f * values, level), level=level)
    return Ct(c.data, c.level, f)


def _encrypted_vs_float64(
    ckks_pair, ps, theta0: np.ndarray, grads: list[np.ndarray], hp: AdamHyper
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """Run ``grads`` through the encrypted circuit (the refresher's decrypt and
    re-encrypt of m, V, r after each step) and through the float64 circuit:
    (decrypted θ, decrypted r, float64 (θ, m, V, r))."""
    part, coord, _, _ = ckks_pair
    m, v, r = initial_state(grads[0] ** 2, hp)
    ref = (theta0, m, v, r)
    f_m, f_v, f_r = StateUnits.of(coord, hp).inp
    l_m, l_v, _ = StateUnits.levels(ps.depth)  # m, V as the refresher sends them

    def enc(values: np.ndarray, f: float = 1.0, level: int = ps.depth) -> Ct:
        return _enc(part, coord, values, f, level)

    def dec(ct: Ct) -> np.ndarray:
        return part.decrypt_ct(ct)

    def state(th: Ct, m: np.ndarray, v: np.ndarray, r: np.ndarray) -> ChunkState:
        return ChunkState(th, enc(m, f_m, l_m), enc(v, f_v, l_v), enc(r, f_r))

    st = state(coord.to_bottom(enc(theta0)), m, v, r)
    gf = coord.gradient_factor
    for t, g in enumerate(grads, start=1):
        x = hp.c * g
        ref = circuit_reference(*ref, x, t, hp)
        xc = enc(x * gf)
        xc.factor = gf
        new = step_chunk(coord, st, xc, t, hp)
        assert (new.theta.level, new.r.level) == (0, 0)
        st = state(new.theta, dec(new.m), dec(new.V), dec(new.r))
    return dec(st.theta), dec(st.r), ref


@pytest.mark.parametrize("hp", [HP, HP_A], ids=["newton", "a4.16"])
def test_encrypted_circuit_tracks_float64_circuit(ckks_pair, ps, hp):
    """60 encrypted steps (refreshed each step) stay within the CKKS tolerance."""
    theta0 = np.random.default_rng(3).normal(0, 0.5, ps.slots)
    theta, r, ref = _encrypted_vs_float64(
        ckks_pair, ps, theta0, _grads(ps.slots, 60), hp
    )
    err = _rel(theta, ref[0], theta0)
    assert err < ckks_circuit_tol(ps), f"relative θ error {err:.2e}"
    assert np.max(np.abs(r / ref[3] - 1)) < 1e-3


@pytest.mark.parametrize("hp", [HP, HP_A], ids=["newton", "a4.16"])
def test_plain_backend_is_the_float64_circuit(plain, ps, hp):
    """The plaintext twin's circuit equals the independent float64 reference."""
    n = ps.slots
    rng = np.random.default_rng(4)
    theta0 = rng.normal(0, 0.5, n)
    grads = _grads(n, 30)
    m, v, r = initial_state(grads[0] ** 2, hp)
    ref = (theta0, m, v, r)
    st = _plain_state(plain, hp, theta0, m, v, r)
    for t, g in enumerate(grads, start=1):
        ref = circuit_reference(*ref, hp.c * g, t, hp)
        new = step_chunk(plain, st, Ct(hp.c * g, 3), t, hp)
        st = _plain_state(plain, hp, *_values(new))
    for got, want, name in zip(_values(st), ref, ("θ", "m", "V", "r"), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


class _Counting:
    """Counts a backend's products (wraps mul and scal)."""

    def __init__(self, be: Backend) -> None:
        self.be, self.products, self.scalars = be, 0, 0

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.be, name)

    def mul(self, a: Ct, b: Ct) -> Ct:
        self.products += 1
        return self.be.mul(a, b)

    def scal(self, a: Ct, c: float, **kw) -> Ct:  # noqa: ANN003
        self.scalars += 1
        return self.be.scal(a, c, **kw)


@pytest.mark.parametrize(("k", "cost"), [(1.0, (6, 1)), (2.0, (11, 6))])
def test_step_cost_in_products(plain, ps, k, cost):
    """Every reply: 6 ct×ct and 1 ct×scalar product per chunk (the public Adam
    constants ride on the state's units); the dropout form 11 and 6."""
    n = ps.slots
    rng = np.random.default_rng(12)
    m, v, r = initial_state(rng.uniform(0, 0.2, n), HP)
    counting = _Counting(plain)
    step_chunk(
        counting,  # type: ignore[arg-type]
        _plain_state(plain, HP, np.zeros(n), m, v, r),
        Ct(HP.c * rng.normal(0, 0.3, n), 3),
        3,
        HP,
        k=k,
    )
    assert (counting.products, counting.scalars) == cost


def test_state_units_round_trip(plain, ckks_pair, ps):
    """A step's stored units times the refresher's scale are the next step's
    input units, for both backends; r's stored factor stays ≤ 1 (masks keep
    their range)."""
    for be in (plain, ckks_pair[1], ckks_pair[0]):
        u = StateUnits.of(be, HP)
        for j, name in enumerate("mVr"):
            assert u.out[j] * u.refresh_scale(name) == pytest.approx(
                u.inp[j], rel=1e-15
            )
        assert max(u.out[0], u.out[2]) < 1.0 and u.out[1] < 1.0011
    # participant (secret context) and coordinator compute the same numbers
    assert StateUnits.of(ckks_pair[0], HP) == StateUnits.of(ckks_pair[1], HP)


def test_step_refuses_state_in_other_units(plain, ps):
    """State given with factor 1 (not StateUnits.inp) is refused, not stepped."""
    n = ps.slots
    m, v, r = initial_state(np.full(n, 0.1), HP)
    st = ChunkState(
        *(Ct(a, lvl) for a, lvl in ((np.zeros(n), 0), (m, 3), (v, 3), (r, 3)))
    )
    with pytest.raises(ValueError, match="state m carries factor 1.0"):
        step_chunk(plain, st, Ct(HP.c * np.ones(n), 3), 1, HP)


def test_float64_circuit_tracks_exact_adam():
    """4000 spiky steps: circuit θ vs exact Adam (same δ, V0) within 1e-2 relative."""
    n, steps = 512, 4000
    theta0 = np.random.default_rng(5).normal(0, 0.5, n)
    grads = _grads(n, steps, seed=6)
    grads = [np.where(np.arange(n) < 100, g, g) for g in grads]
    v0 = grads[0] ** 2
    m, v, r = initial_state(v0, HP)
    state = (theta0, m, v, r)
    for t, g in enumerate(grads, start=1):
        state = circuit_reference(*state, HP.c * g, t, HP)
    exact = exact_adam(theta0, grads, v0, HP)
    err = _rel(state[0], exact, theta0)
    assert err < 1e-2, f"circuit vs exact Adam: {err:.2e}"


def test_max_clipped_spike_keeps_u_le_1_and_r_positive():
    """g = ±1 after a long run of zeros (r at its largest) gives u ≤ 1 and r > 0."""
    n = 64
    m, v, r = initial_state(np.zeros(n), HP)
    theta = np.zeros(n)
    for t in range(1, 200):
        theta, m, v, r = circuit_reference(theta, m, v, r, np.zeros(n), t, HP)
    x = HP.c * np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    u = (x * r) ** 2
    assert np.all(u <= 1.0 + 1e-9), f"u up to {u.max()}"
    theta, m, v, r = circuit_reference(theta, m, v, r, x, 200, HP)
    assert np.all(r > 0)


@pytest.mark.parametrize("u_target", [1.2, 1.6, 1.95])
def test_forced_u_between_1_and_2_keeps_r_positive(u_target):
    """Newton's step keeps r > 0 for any u < 2 (and r recovers toward V^(−1/2))."""
    n = 16
    m, v, r = initial_state(np.full(n, 1e-6), HP)
    x = np.full(n, np.sqrt(u_target) / r[0])
    theta, m, v, r = circuit_reference(np.zeros(n), m, v, r, x, 1, HP)
    assert np.all(r > 0)
    for t in range(2, 12):
        theta, m, v, r = circuit_reference(theta, m, v, r, np.zeros(n), t, HP)
    assert np.all(np.abs(r * np.sqrt(v) - 1) < 0.05)


def test_rsqrt_a_bounds_r_after_a_spike(plain, ps):
    """One step from an exact r at u = x²r² ∈ [0, 1]: Newton's r' (A = 3) lands
    29 % low at u = 1; A = 4.16 keeps r'·√V' within 3.4 % of 1 everywhere, as
    :func:`rsqrt_step_error` says (to the c²δ·r² term it ignores)."""
    a = minimax_rsqrt_a(1.0)
    assert 4.15 < a < 4.17
    u = np.linspace(0.0, 1.0, ps.slots)
    assert np.abs(rsqrt_step_error(a, u)).max() < 0.034
    v = np.full(ps.slots, 0.01)  # V0 = mean g² + δ with g small: r at its largest
    for hp, worst in ((HP, 0.2929), (HP_A, 0.0335)):
        m, v0, r = initial_state(v, hp)  # V0 = v + δ, r = V0^(−½) exactly
        x = np.sqrt(u) / r  # u = x²r²: x = c·g with |g| ≤ 1 needs u ≤ u_max = 1
        new = step_chunk(
            plain, _plain_state(plain, hp, np.zeros_like(u), m, v0, r), Ct(x, 3), 1, hp
        )
        _, _, v1, r1 = _values(new)
        err = r1 * np.sqrt(v1) - 1.0
        np.testing.assert_allclose(err, rsqrt_step_error(hp.rsqrt_a, u), atol=2e-3)
        assert np.abs(err).max() == pytest.approx(worst, abs=2e-3)
        assert err[0] == pytest.approx(0.0, abs=2e-3)  # u = 0: both exact


def test_rsqrt_a_recovers_after_a_spike():
    """After a u = 1 spike, r under A = 4.16 returns toward V^(−½) (errors shrink
    by (A − 3)/(A − 1) ≈ 0.37 per step) and settles within its first-order bias
    (½ − 1/(A − 1))·(1 − β2) ≈ 1.8e-4 as V decays with zero gradients (Newton's
    settles at 0 but starts 29 % low)."""
    n = 16
    out = {}
    for hp in (HP, HP_A):
        m, v, r = initial_state(np.full(n, 1e-6), hp)
        x = np.full(n, 1.0 / r[0])  # u = 1
        theta, m, v, r = circuit_reference(np.zeros(n), m, v, r, x, 1, hp)
        errs = [np.abs(r * np.sqrt(v) - 1).max()]
        for t in range(2, 30):
            theta, m, v, r = circuit_reference(theta, m, v, r, np.zeros(n), t, hp)
            errs.append(np.abs(r * np.sqrt(v) - 1).max())
        out[hp.rsqrt_a] = errs
    assert out[3.0][0] > 0.29 and out[4.16][0] < 0.034
    assert out[4.16][1] < 0.5 * out[4.16][0]
    assert out[4.16][-1] < 2.5e-4 and out[3.0][-1] < 1e-6
    assert sum(out[4.16]) < 0.5 * sum(out[3.0])  # less lost step size in total


def test_rsqrt_a_is_a_checked_run_config_value():
    from protocol.config import RunConfig
    from protocol.errors import ConfigError

    assert RunConfig.from_mapping({}).hyper.rsqrt_a == 3.0
    assert RunConfig.from_mapping({"rsqrt-a": 4.16}).hyper.rsqrt_a == 4.16
    assert HP_A.s == pytest.approx(1 / (3.16 * np.sqrt(HP_A.beta2)))
    for bad in (2.0, 6.5, float("nan")):
        with pytest.raises(ConfigError, match="rsqrt-a"):
            RunConfig.from_mapping({"rsqrt-a": bad})


def test_depth_is_enforced_by_both_backends(plain, ckks_pair, ps):
    """A fourth product raises DepthExceeded in the twin, as CKKS would fail."""
    a = Ct(np.ones(ps.slots), ps.depth)
    for _ in range(ps.depth):
        a = plain.mul(a, a)
    with pytest.raises(DepthExceeded):
        plain.mul(a, a)


def test_exact_adam_optimizer_matches_reference(plain, ps):
    """optimizer='exact-adam' on the twin equals exact Adam with the same V0."""
    from coordinator.he_adam import exact_step_chunk

    n = ps.slots
    theta0 = np.random.default_rng(7).normal(0, 0.5, n)
    grads = _grads(n, 40, seed=8)
    v0 = grads[0] ** 2
    m, v, r = initial_state(v0, HP)
    st = _plain_state(plain, HP, theta0, m, v, r)
    for t, g in enumerate(grads, start=1):
        new = exact_step_chunk(plain, st, Ct(HP.c * g, 3), t, HP)
        st = _plain_state(plain, HP, *_values(new))
    np.testing.assert_allclose(
        st.theta.data, exact_adam(theta0, grads, v0, HP), rtol=0, atol=1e-12
    )


def test_exact_adam_refused_with_ckks(ckks_pair):
    """exact-adam is a plaintext reference: the CKKS backend refuses it."""
    from coordinator.he_adam import exact_step_chunk
    from protocol.errors import ConfigError

    _, coord, _, _ = ckks_pair
    with pytest.raises(ConfigError, match="backend 'plain'"):
        exact_step_chunk(coord, None, None, 1, HP)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "k, hyper", [(4 / 3, HP), (2.0, HP), (4.0, HP), (2.0, HP_A)], ids=str
)
def test_dropout_step_matches_plaintext_twin(k, hyper, ckks_pair, plain, ps):
    """With K' < K replies the k = K/K' form equals the twin and reference on k·x."""
    part, coord, _, _ = ckks_pair
    n = ps.slots
    rng = np.random.default_rng(11)
    theta0 = rng.normal(0, 0.5, n)
    g = np.clip(rng.normal(0, 0.3, n), -1, 1) / k  # what K' of K replies sum to
    m = rng.normal(0, 0.05, n)
    _, v, r = initial_state(rng.uniform(0, 0.2, n), hyper)
    t = 5
    ref = circuit_reference(theta0, m, v, r, hyper.c * g * k, t, hyper)

    f_m, f_v, f_r = StateUnits.of(coord, hyper).inp
    l_m, l_v, _ = StateUnits.levels(ps.depth)  # m, V as the refresher sends them

    def enc(values: np.ndarray, f: float = 1.0, level: int = ps.depth) -> Ct:
        return _enc(part, coord, values, f, level)

    gf = coord.gradient_factor
    xc = enc(hyper.c * g * gf)
    xc.factor = gf
    st = ChunkState(
        coord.to_bottom(enc(theta0)), enc(m, f_m, l_m), enc(v, f_v, l_v), enc(r, f_r)
    )
    new = step_chunk(coord, st, xc, t, hyper, k=k)
    twin = step_chunk(
        plain,
        _plain_state(plain, hyper, theta0, m, v, r),
        Ct(hyper.c * g, 3),
        t,
        hyper,
        k=k,
    )
    for got, want, name in zip(_values(twin), ref, ("θ", "m", "V", "r"), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)
    dec = part.decrypt(coord.dump(new.theta), level=0)
    rel = np.max(np.abs(dec - ref[0])) / np.max(np.abs(ref[0] - theta0))
    assert rel < ckks_circuit_tol(ps), rel
    assert new.theta.level == 0 and new.r.level == 0
    dec_r = part.decrypt_ct(new.r)
    assert np.max(np.abs(dec_r / ref[3] - 1)) < 1e-3
    for name, i in (("m", 1), ("V", 2)):  # the other state, in its units
        got = part.decrypt_ct(getattr(new, name))
        assert np.max(np.abs(got - ref[i])) < 1e-4 * np.max(np.abs(ref[i])), name


def test_annealed_learning_rate_schedule():
    """anneal-lr: lr·(1 − (t−1)/T), never below lr/T; a_t keeps its bias term."""
    from protocol.config import RunConfig

    hp = AdamHyper(lr=0.01, anneal_steps=100)
    assert [hp.lr_at(t) for t in (1, 51, 100, 150)] == pytest.approx(
        [0.01, 0.005, 1e-4, 1e-4]
    )
    assert hp.a(3) == pytest.approx(0.01 * 0.98 / (1 - 0.9**3))
    assert AdamHyper(lr=0.01).lr_at(10**6) == 0.01
    cfg = RunConfig.from_mapping({"anneal-lr": "true", "num-rounds": 40})
    assert cfg.hyper.anneal_steps == 40
    assert RunConfig.from_mapping({"num-rounds": 40}).hyper.anneal_steps == 0


def test_encrypted_circuit_with_annealed_lr_tracks_float64(ckks_pair, ps):
    """Down to lr/T on the last step, the encrypted circuit stays within tolerance
    of the float64 circuit under the same schedule."""
    steps = 12
    hp = AdamHyper(lr=HP.lr, anneal_steps=steps)
    theta0 = np.random.default_rng(5).normal(0, 0.5, ps.slots)
    grads = _grads(ps.slots, steps, seed=6)
    theta, _, ref = _encrypted_vs_float64(ckks_pair, ps, theta0, grads, hp)
    const = (theta0, *initial_state(grads[0] ** 2, HP))  # same steps, constant lr
    for t, g in enumerate(grads, start=1):
        const = circuit_reference(*const, HP.c * g, t, HP)
    moved = np.abs(ref[0] - theta0).sum()
    assert moved < 0.8 * np.abs(const[0] - theta0).sum()  # the schedule slowed it
    err = _rel(theta, ref[0], theta0)
    assert err < ckks_circuit_tol(ps), f"relative θ error {err:.2e}"
