"""HE-Adam: Adam on ciphertexts at depth 3, with no inverse-square-root polynomial.

The circuit of ARCHITECTURE §6 (hedrl's design; it builds on Nguyen, Dinh,
Nguyen, Lauter & Kim, Nature Machine Intelligence 7, 2025). State per slot:
θ, m, V (= v + δ) and r ≈ V^(−1/2). One Newton step, warm-started from
β2^(−1/2)·r, tracks V'^(−1/2):

    depth 1:  X2 = x·x   R2 = r·r   W = (V + c²δ) + X2   m' = β1·m + ((1−β1)/c)·x
    depth 2:  P = W·R2   nr = m'·((−a_t·s)·r)   V' = β2·W + (1−β2)·δ − β2c²δ
    depth 3:  H = 3 − P   r' = (s·r)·H   θ' = θ + nr·H

P = W·r² equals ARCHITECTURE §6's q·r + p·p (p = x·r, q = (V + c²δ)·r) with
two products fewer.

with c = sqrt((1−β2)/β2), s = β2^(−1/2)/2, δ = c²/u_max and, because V starts
from data (V0 = mean g² + δ), a_t = lr/(1−β1^t). ``x`` is the sum of the
participants' ``c·w_i·clip(g)/G``. The same code runs on the plaintext twin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.adam import AdamHyper, initial_state
from protocol.backend import Backend, Ct, PlainBackend
from protocol.errors import ConfigError

__all__ = ["AdamHyper", "ChunkState", "initial_state", "step", "step_chunk"]


@dataclass
class ChunkState:
    """Encrypted optimiser state of one slot-chunk."""

    theta: Ct
    m: Ct
    V: Ct
    r: Ct


def _scal_for(be: Backend, a: Ct, c: float, partner: Ct, last: Ct) -> Ct:
    """``c·a`` with the factor that makes ``(c·a)·partner`` then ``·last`` exact.

    Computes the out_factor of ``scal`` so that multiplying the result by
    ``partner`` and that product by ``last`` carries factor 1 (ARCHITECTURE §5:
    TenSEAL's rescale bias is folded into the public scalars).
    """
    lvl1 = min(a.level - 1, partner.level)
    lvl2 = min(lvl1 - 1, last.level)
    f_prod = 1.0 / (last.factor * be.rescale_bias(lvl2))
    return be.scal(a, c, out_factor=f_prod / (partner.factor * be.rescale_bias(lvl1)))


def _scal_into(be: Backend, a: Ct, c: float, last: Ct) -> Ct:
    """``c·a`` with the factor that makes ``(c·a)·last`` carry factor 1."""
    lvl = min(a.level - 1, last.level)
    return be.scal(a, c, out_factor=1.0 / (last.factor * be.rescale_bias(lvl)))


def step_chunk(
    be: Backend, st: ChunkState, x: Ct, t: int, hp: AdamHyper, k: float = 1.0
) -> ChunkState:
    """One HE-Adam step on one chunk; t counts from 1.

    With every reply (k = 1) P = q·r + p·p is evaluated as W·r² with
    W = (V + c²δ) + x²: 6 ct×ct products instead of 8, the same values. x
    carries the participants' factor b_top^(−½), so x² has factor 1 and adds to
    V without a scalar product.

    ``k = K/K'`` corrects for dropouts: participants weighted their gradient by
    1/K before they knew that only K' would reply, so the circuit runs on k·x.
    k enters m' and V' through their public scalars; for r' and θ' the factor k²
    of p·p lands on a depth-1 factor (ARCHITECTURE §6) — still depth 3, 11
    products. (Folding k² into W instead would shrink the scalars on r by K'²,
    and CKKS's rescale noise, ~2^-22 absolute at 35-bit scale, would cost that
    factor in precision: measured 3–7e-4 relative error vs 4e-5.)
    """
    c, s, d = hp.c, hp.s, hp.delta
    x2 = be.mul(x, x)  # depth 1
    m_new = be.add(be.scal(st.m, hp.beta1), be.scal(x, k * (1 - hp.beta1) / c))
    vc = be.add_scalar(st.V, c * c * d)
    if k == 1.0:
        if abs(x2.factor / vc.factor - 1.0) > 1e-12:  # x without b_top^(−½)
            vc = be.scal(vc, 1.0, out_factor=x2.factor)
        w = be.add(vc, x2)  # (V + c²δ) + x², depth 1
        h = be.add_scalar(be.neg(be.mul(w, be.mul(st.r, st.r))), 3.0)  # 3 − P
        v_new = be.add_scalar(
            be.scal(w, hp.beta2), (1 - hp.beta2) * d - hp.beta2 * c * c * d
        )  # β2·(V + x²) + (1−β2)·δ
        r_new = be.mul(_scal_into(be, st.r, s, h), h)  # depth 3
        nr = be.mul(m_new, _scal_for(be, st.r, -hp.a(t) * s, m_new, h))
        theta_new = be.add(st.theta, be.mul(nr, h))  # depth 3
        return ChunkState(theta=theta_new, m=m_new, V=v_new, r=r_new)
    # dropout form: H = A − k²·B with A = 3 − q·r and B = p·p
    p = be.mul(x, st.r)
    q = be.mul(vc, st.r)
    v_new = be.add_scalar(
        be.add(be.scal(st.V, hp.beta2), be.scal(x2, hp.beta2 * k * k)),
        (1 - hp.beta2) * d,
    )
    qr = be.mul(q, st.r)
    pp = be.mul(p, p)
    a = be.add_scalar(be.neg(qr), 3.0)
    r_new = be.sub(
        be.mul(_scal_into(be, st.r, s, a), a),
        be.mul(_scal_into(be, st.r, k * k * s, pp), pp),
    )
    nr = be.mul(m_new, _scal_for(be, st.r, -hp.a(t) * s, m_new, a))
    mk = be.mul(m_new, _scal_for(be, st.r, hp.a(t) * s * k * k, m_new, pp))
    theta_new = be.add(be.add(st.theta, be.mul(nr, a)), be.mul(mk, pp))
    return ChunkState(theta=theta_new, m=m_new, V=v_new, r=r_new)


def exact_step_chunk(
    be: Backend, st: ChunkState, x: Ct, t: int, hp: AdamHyper, k: float = 1.0
) -> ChunkState:
    """Exact Adam on the plaintext twin's arrays (the "unencrypted counterpart").

    Same state convention (V = v + δ, r = V^(−1/2)) and output levels as
    :func:`step_chunk`, so the refresh path is shared; only the update differs:
    θ' = θ − a_t·m'/sqrt(v' + δ) with an exact square root.
    """
    if not isinstance(be, PlainBackend):
        raise ConfigError("optimizer 'exact-adam' needs backend 'plain'")
    g = k * x.data * x.factor / hp.c
    m = hp.beta1 * st.m.data + (1 - hp.beta1) * g
    v = hp.beta2 * st.V.data + (1 - hp.beta2) * (g * g + hp.delta)
    theta = st.theta.data - hp.a(t) * m / np.sqrt(v)
    top = be.top_level
    return ChunkState(
        theta=Ct(theta, 0),
        m=Ct(m, top - 1),
        V=Ct(v, top - 2),
        r=Ct(1.0 / np.sqrt(v), 0),
    )


OPTIMIZERS = {"he-adam": step_chunk, "exact-adam": exact_step_chunk}


def step(
    be: Backend,
    state: list[ChunkState],
    xs: list[Ct],
    t: int,
    hp: AdamHyper,
    optimizer: str = "he-adam",
    k: float = 1.0,
) -> list[ChunkState]:
    """One optimiser step over all chunks (k = K/K' corrects for dropouts)."""
    fn = OPTIMIZERS[optimizer]
    return [fn(be, st, x, t, hp, k) for st, x in zip(state, xs, strict=True)]


# ---- float64 references -------------------------------------------------------
def circuit_reference(
    theta: np.ndarray,
    m: np.ndarray,
    V: np.ndarray,
    r: np.ndarray,
    x: np.ndarray,
    t: int,
    hp: AdamHyper,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same circuit in float64 numpy, written out independently."""
    c, s, d = hp.c, hp.s, hp.delta
    p, q = x * r, (V + c * c * d) * r
    m_new = hp.beta1 * m + (1 - hp.beta1) / c * x
    big_p = q * r + p * p
    v_new = hp.beta2 * (V + x * x) + (1 - hp.beta2) * d
    h = 3.0 - big_p
    r_new = s * r * h
    theta_new = theta + m_new * (-hp.a(t) * s * r) * h
    return theta_new, m_new, v_new, r_new


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
