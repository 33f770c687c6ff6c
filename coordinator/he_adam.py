"""HE-Adam: Adam on ciphertexts at depth 3, with no inverse-square-root polynomial.

The circuit of docs/design.md#he-adam (hedrl's design; it builds on Nguyen, Dinh,
Nguyen, Lauter & Kim, Nature Machine Intelligence 7, 2025). State per slot:
θ, m, V (= v + δ) and r ≈ V^(−1/2). One Newton step (A = 3), warm-started
from β2^(−1/2)·r, tracks V'^(−1/2):

    depth 1:  X2 = x·x   R2 = r·r   W = (V + c²δ) + X2   m' = β1·m + ((1−β1)/c)·x
    depth 2:  P = W·R2   nr = m'·((−a_t·s)·r)            V' = β2·W
    depth 3:  H = A − P   r' = (s·r)·H   θ' = θ + nr·H

(``AdamHyper.rsqrt_a`` = A; s = β2^(−1/2)/(A − 1): another A is the same
circuit with a smaller worst-case error after gradient spikes.)

P = W·r² equals the q·r + p·p of docs/design.md#he-adam (p = x·r, q = (V + c²δ)·r)
with two products fewer, and V' = β2·W is its β2·(V + x²) + (1−β2)·δ because
β2·c² = 1 − β2. The public scalars β1, (1−β1)/c, β2 and s are not multiplied
into ciphertexts: m, V and r carry them as known factors
(:class:`protocol.adam.StateUnits`) that the refresher applies while it
re-encrypts, so the step is 6 ct×ct products and one ct×scalar product (the
step size a_t, which changes every step).

with c = sqrt((1−β2)/β2), s = β2^(−1/2)/(A − 1), δ = c²/u_max and, because V starts
from data (V0 = mean g² + δ), a_t = lr/(1−β1^t). ``x`` is the sum of the
participants' ``c·w_i·clip(g)/G``. The same code runs on the plaintext twin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.adam import AdamHyper, StateUnits, circuit_reference, initial_state
from protocol.backend import Backend, Ct, PlainBackend
from protocol.errors import ConfigError

__all__ = [
    "AdamHyper",
    "ChunkState",
    "circuit_reference",
    "StateUnits",
    "initial_state",
    "step_chunk",
]


@dataclass
class ChunkState:
    """Encrypted optimiser state of one slot-chunk.

    Into a step m, V, r carry the factors ``StateUnits.inp``, out of it
    ``StateUnits.out``; θ carries factor 1.
    """

    theta: Ct
    m: Ct
    V: Ct
    r: Ct


def _scal_for(be: Backend, a: Ct, c: float, partner: Ct, last: Ct) -> Ct:
    """``c·a`` with the factor that makes ``(c·a)·partner`` then ``·last`` exact.

    Computes the out_factor of ``scal`` so that multiplying the result by
    ``partner`` and that product by ``last`` carries factor 1 (TenSEAL's
    rescale bias is folded into the public scalars: docs/design.md#tenseal-facts).
    """
    lvl1 = min(a.level - 1, partner.level)
    lvl2 = min(lvl1 - 1, last.level)
    f_prod = 1.0 / (last.factor * be.rescale_bias(lvl2))
    return be.scal(a, c, out_factor=f_prod / (partner.factor * be.rescale_bias(lvl1)))


def _scal_into(be: Backend, a: Ct, c: float, last: Ct, target: float = 1.0) -> Ct:
    """``c·a`` with the factor that makes ``(c·a)·last`` carry ``target``."""
    lvl = min(a.level - 1, last.level)
    return be.scal(a, c, out_factor=target / (last.factor * be.rescale_bias(lvl)))


def _as(a: Ct, factor: float) -> Ct:
    """The same data read as a value with ``factor`` (the value changes)."""
    return Ct(a.data, a.level, factor)


def _check_units(be: Backend, st: ChunkState, x: Ct, units: StateUnits) -> None:
    for name, c, f in zip("mVr", (st.m, st.V, st.r), units.inp, strict=True):
        if abs(c.factor / f - 1.0) > 1e-9:
            raise ValueError(
                f"state {name} carries factor {c.factor!r}, the step expects {f!r} "
                "(StateUnits.inp)"
            )
    if abs(x.factor / be.gradient_factor - 1.0) > 1e-9:
        raise ValueError(
            f"gradient sum carries factor {x.factor!r}, participants send "
            f"{be.gradient_factor!r} (Backend.gradient_factor)"
        )


def step_chunk(
    be: Backend, st: ChunkState, x: Ct, t: int, hp: AdamHyper, k: float = 1.0
) -> ChunkState:
    """One HE-Adam step on one chunk; t counts from 1.

    With every reply (k = 1): 6 ct×ct products and one ct×scalar product.
    x carries the participants' factor b_top^(−½), so x² has factor 1 and adds
    to V without a scalar product; m, V, r come in and go out in the units of
    :class:`StateUnits`.

    ``k = K/K'`` corrects for dropouts: participants weighted their gradient by
    1/K before they knew that only K' would reply, so the circuit runs on k·x.
    k enters m' and V' through scalar products; for r' and θ' the factor k²
    of p·p lands on a depth-1 factor (docs/design.md#he-adam) — still depth 3, 11
    products. (Folding k² into W instead would shrink the scalars on r by K'²,
    and CKKS's rescale noise, ~2^-22 absolute at 35-bit scale, would cost that
    factor in precision: measured 3–7e-4 relative error vs 4e-5.)
    """
    units = StateUnits.of(be, hp)
    _check_units(be, st, x, units)
    f_m, f_v, f_r = units.out
    c, s, d = hp.c, hp.s, hp.delta
    x2 = be.mul(x, x)  # depth 1, factor 1
    vc = be.add_scalar(st.V, c * c * d)  # V + c²δ, factor 1
    if k == 1.0:
        w = be.add(vc, x2)  # W = V + c²δ + x², depth 1
        m_new = _as(be.add(st.m, x), f_m)  # β1·m + ((1−β1)/c)·x, no level
        h = be.add_scalar(be.neg(be.mul(w, be.mul(st.r, st.r))), hp.rsqrt_a)  # A − P
        r_new = be.mul(st.r, h)  # r·H: s·r·H with factor ·1/s
        nr = be.mul(m_new, _scal_for(be, st.r, -hp.a(t) * s, m_new, h))
        theta_new = be.add(st.theta, be.mul(nr, h))  # depth 3
        return ChunkState(
            theta=theta_new,
            m=m_new,
            V=_as(w, f_v),  # β2·W = V'
            r=_as(r_new, r_new.factor / s),
        )
    # dropout form: H = Q − k²·B with Q = A − (V + c²δ)·r² and B = (x·r)²
    kx = be.scal(x, k, out_factor=x.factor)
    m_new = _as(be.add(st.m, kx), f_m)
    v_new = _as(be.add(vc, be.scal(x2, k * k)), f_v)  # V'/β2 = V + c²δ + k²x²
    p = be.mul(x, st.r)
    qr = be.mul(vc, be.mul(st.r, st.r))  # V may sit one level below the top
    pp = be.mul(p, p)
    a = be.add_scalar(be.neg(qr), hp.rsqrt_a)
    r_new = be.sub(
        be.mul(_scal_into(be, st.r, s, a, f_r), a),
        be.mul(_scal_into(be, st.r, k * k * s, pp, f_r), pp),
    )
    nr = be.mul(m_new, _scal_for(be, st.r, -hp.a(t) * s, m_new, a))
    mk = be.mul(m_new, _scal_for(be, st.r, hp.a(t) * s * k * k, m_new, pp))
    theta_new = be.add(be.add(st.theta, be.mul(nr, a)), be.mul(mk, pp))
    return ChunkState(theta=theta_new, m=m_new, V=v_new, r=r_new)


def exact_step_chunk(
    be: Backend, st: ChunkState, x: Ct, t: int, hp: AdamHyper, k: float = 1.0
) -> ChunkState:
    """Exact Adam on the plaintext twin's arrays (the "unencrypted counterpart").

    Same state convention (V = v + δ, r = V^(−1/2), the units of
    :class:`StateUnits`) as :func:`step_chunk`, so the refresh path is shared;
    only the update differs: θ' = θ − a_t·m'/sqrt(v' + δ) with an exact
    square root.
    """
    if not isinstance(be, PlainBackend):
        raise ConfigError("optimizer 'exact-adam' needs backend 'plain'")
    units = StateUnits.of(be, hp)
    _check_units(be, st, x, units)
    g = k * (x.data / x.factor) / hp.c
    m = hp.beta1 * (st.m.data / st.m.factor) + (1 - hp.beta1) * g
    v = hp.beta2 * (st.V.data / st.V.factor) + (1 - hp.beta2) * (g * g + hp.delta)
    theta = st.theta.data - hp.a(t) * m / np.sqrt(v)
    f_m, f_v, f_r = units.out
    return ChunkState(
        theta=Ct(theta, 0),
        m=Ct(f_m * m, be.top_level, f_m),
        V=Ct(f_v * v, be.top_level - 1, f_v),
        r=Ct(f_r / np.sqrt(v), 0, f_r),
    )


def sum_step_chunk(
    be: Backend,
    st: ChunkState,
    x: Ct,
    t: int,
    hp: AdamHyper,
    k: float = 1.0,
    *,
    momentum: bool,
) -> ChunkState:
    """The baselines on the encrypted mean x (participants send w·clip(u, ±G)):
    m' = β1·m + ((1−β1)/c)·k·x as in HE-Adam (free at k = 1), then
    θ' = θ − lr·k·x (fedavg) or θ' = θ − lr·m'/((1−β1)/c) (fedavgm: server
    momentum M' = β1·M + k·x). V and r pass through unchanged in value (one
    scalar product each into the units :class:`StateUnits` stores them in)."""
    units = StateUnits.of(be, hp)
    _check_units(be, st, x, units)
    f_m, f_v, f_r = units.out
    kx = x if k == 1.0 else be.scal(x, k, out_factor=x.factor)
    m_new = _as(be.add(st.m, kx), f_m)
    if momentum:
        theta_new = be.add(st.theta, be.scal(m_new, -hp.lr_at(t) / hp.m_coef))
    else:
        theta_new = be.add(st.theta, be.scal(x, -hp.lr_at(t) * k))
    return ChunkState(
        theta=theta_new,
        m=m_new,
        V=be.scal(st.V, 1.0, out_factor=f_v),
        r=be.scal(st.r, 1.0, out_factor=f_r),
    )


def fedavg_step_chunk(
    be: Backend, st: ChunkState, x: Ct, t: int, hp: AdamHyper, k: float = 1.0
) -> ChunkState:
    return sum_step_chunk(be, st, x, t, hp, k, momentum=False)


def fedavgm_step_chunk(
    be: Backend, st: ChunkState, x: Ct, t: int, hp: AdamHyper, k: float = 1.0
) -> ChunkState:
    return sum_step_chunk(be, st, x, t, hp, k, momentum=True)


OPTIMIZERS = {
    "he-adam": step_chunk,
    "exact-adam": exact_step_chunk,
    "fedavg": fedavg_step_chunk,
    "fedavgm": fedavgm_step_chunk,
}


# ---- float64 references -------------------------------------------------------
def exact_adam(
    theta: np.ndarray, grads: list[np.ndarray], v0: np.ndarray, hp: AdamHyper
) -> np.ndarray:
    """Exact Adam (δ inside the √, v from ``v0``, lr/(1−β1^t)) over ``grads``."""
    theta = np.asarray(theta, dtype=np.float64).copy()
    m = np.zeros_like(theta)
    v = np.asarray(v0, dtype=np.float64).copy()
    for t, g in enumerate(grads, start=1):
        m = hp.beta1 * m + (1 - hp.beta1) * g
        v = hp.beta2 * v + (1 - hp.beta2) * g * g
        theta -= hp.a(t) * m / np.sqrt(v + hp.delta)
    return theta
