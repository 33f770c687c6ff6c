"""HE-Adam's public constants, shared by participants (pre-scaling) and coordinator."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from protocol.backend import Backend

#: Scale of r in the step's input, relative to (b_L·b_(L−1))^(−½): puts
#: P = W·r² at 0.75² of its value, so the stored r' (= factor·r') stays below
#: r' itself and the refresh masks keep their full range.
R_SCALE = 0.75


@dataclass(frozen=True)
class AdamHyper:
    """Public HE-Adam constants (docs/design.md#he-adam)."""

    lr: float = 2e-3
    """Learning rate."""
    beta1: float = 0.9
    """First-moment decay."""
    beta2: float = 0.999
    """Second-moment decay."""
    u_max: float = 1.0
    """Bound on u = x²r² for clipped gradients; sets δ = c²/u_max."""
    anneal_steps: int = 0
    """If > 0, lr decays linearly over this many steps: lr·(1 − (t−1)/T), never
    below lr/T (a public scalar of 0 would make CKKS ciphertexts transparent)."""
    rsqrt_a: float = 3.0
    """The constant A of r's update r' = r·(A − P)/((A − 1)·√β2), P = V'·r²/β2.
    A = 3 is one Newton step for V'^(−½): exact to first order in u = x²r², but
    after a spike it lands low (r'·√V' = 0.71 at u = 1). Any A keeps the fixed
    point r = V^(−½) and costs the same; A = 4.16 (:func:`minimax_rsqrt_a`)
    keeps r'·√V' within 3.4 % of 1 over u ∈ [0, u_max = 1], at a first-order
    error of (½ − 1/(A − 1))·u for small u and errors shrinking by (A − 3)/(A − 1)
    per step instead of quadratically."""

    @property
    def c(self) -> float:
        """Gradient pre-scale sqrt((1−β2)/β2): participants send c·w·g."""
        return math.sqrt((1 - self.beta2) / self.beta2)

    @property
    def m_coef(self) -> float:
        """x's weight (1−β1)/c in m' = β1·m + m_coef·x (x = c·w·g)."""
        return (1 - self.beta1) / self.c

    @property
    def s(self) -> float:
        """r's update constant β2^(−½)/(A − 1) (Newton, A = 3: β2^(−½)/2)."""
        return 1.0 / ((self.rsqrt_a - 1.0) * math.sqrt(self.beta2))

    @property
    def delta(self) -> float:
        """The δ floor inside the square root (normalised gradient units)."""
        return self.c**2 / self.u_max

    def lr_at(self, t: int) -> float:
        """The learning rate of step t (t counts from 1)."""
        if self.anneal_steps <= 0:
            return self.lr
        T = self.anneal_steps
        return self.lr * max(1.0 - (t - 1) / T, 1.0 / T)

    def a(self, t: int) -> float:
        """Step size a_t = lr_t/(1−β1^t) (V starts from data: no √(1−β2^t))."""
        return self.lr_at(t) / (1 - self.beta1**t)


def rsqrt_step_error(a: float, u: np.ndarray) -> np.ndarray:
    """r'·√V' − 1 after one update with constant ``a`` from an exact r, at u = x²r².

    The warm start β2^(−½)·r is then √(1 + u) times V'^(−½) (ignoring the
    c²δ·r² = c²δ/V ≤ c² ≈ 1e-3 term), and the update multiplies it by
    (a − (1 + u))/(a − 1).
    """
    u = np.asarray(u, dtype=np.float64)
    return np.sqrt(1.0 + u) * (a - 1.0 - u) / (a - 1.0) - 1.0


def minimax_rsqrt_a(u_max: float = 1.0) -> float:
    """The A whose worst |r'·√V' − 1| over u ∈ [0, u_max] is smallest.

    The error is 0 at u = 0, peaks above 0 where 1 + u = A/3 and falls below 0
    towards u = u_max; the best A balances the two (bisection on A).
    """
    u = np.linspace(0.0, u_max, 4001)
    lo, hi = 3.0, 3.0 + 4.0 * u_max
    for _ in range(60):
        a = 0.5 * (lo + hi)
        err = rsqrt_step_error(a, u)
        if err.max() > -err.min():
            hi = a
        else:
            lo = a
    return 0.5 * (lo + hi)


def step_sup(hp: AdamHyper, horizon: int = 64) -> float:
    """The largest |θ' − θ| per element one step can make, in units of lr.

    With clipped gradients g_j ∈ [−1, 1] (normalised units), v starting from
    data (v0 = g1² at least: the refresher's mean of squares is no smaller than
    the square of the mean) and δ once inside the root (V_t = v_t + δ: V0 holds
    one δ and each step adds (1−β2)·δ while decaying it by β2), step t moves an
    element by a_t·|m_t|/√(v_t + δ), a ratio of a linear form in the g_j to the root of
    a quadratic one. Over g ∈ [0, 1]^t its maximum has the form
    g_j = min(1, λ·w_j/u_j) (w_j, u_j: the weights of g_j in m_t and v_t), so a
    search over λ for each t up to ``horizon`` finds it. The ratio peaks in the
    first steps, where the bias correction 1/(1 − β1^t) is largest: 12.8 at
    β1 = 0.9, β2 = 0.999 (a zero gradient, then g = 1 three times); later steps
    stay below the Cauchy–Schwarz bound (1−β1)/√((1−β2)(1−β1²/β2)) ≈ 7.3. The
    honest runs of every preset moved θ by at most 7.7·lr. HE-Adam's r can exceed
    V^(−½) by the worst :func:`rsqrt_step_error` of its constant A (0 for A = 3:
    Newton's step from a warm start never overshoots), which multiplies this.
    """
    return _step_sup(hp.beta1, hp.beta2, hp.delta, hp.rsqrt_a, horizon)


@functools.lru_cache(maxsize=32)
def _step_sup(
    beta1: float, beta2: float, delta: float, a: float, horizon: int
) -> float:
    lam = np.geomspace(1e-3, 1e4, 400)[:, None]
    best = 0.0
    for t in range(1, horizon + 1):
        age = np.arange(t)[::-1]  # g_1 (oldest) … g_t
        w = (1 - beta1) * beta1**age / (1 - beta1**t)
        u = (1 - beta2) * beta2**age
        u[0] += beta2**t  # v0 ≥ g_1², decayed t times
        g = np.minimum(1.0, lam * (w / u))
        steps = (g @ w) / np.sqrt(delta + (g * g) @ u)  # V_t = v_t + δ
        best = max(best, float(steps.max()))
    overshoot = float(np.max(rsqrt_step_error(a, np.linspace(0, 1, 401))))
    return best * (1.0 + max(0.0, overshoot))


def initial_state(
    squares_mean: np.ndarray, hp: AdamHyper
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """m0 = 0, V0 = mean g² + δ and r0 = V0^(−1/2) (computed by a key holder)."""
    v0 = np.asarray(squares_mean, dtype=np.float64) + hp.delta
    return np.zeros_like(v0), v0, 1.0 / np.sqrt(v0)


@dataclass(frozen=True)
class StateUnits:
    """The public factors m, V and r carry around HE-Adam's step.

    A step reads its state as ``data = inp·value`` and leaves it as ``data =
    out·value`` (per name m, V, r); θ always has factor 1. The factors are
    chosen so that every public scalar of Adam except the step size lands
    here instead of in a ciphertext×scalar product (each costs a rescale):
    m' = β1·m + k'·x becomes the sum M + X, V' = β2·W is W itself, and the
    Newton constant s goes into r' (the circuit of docs/design.md#he-adam, 6
    ct×ct and 1 ct×scalar products). The refresher, who decrypts the masked
    state anyway, multiplies by :meth:`refresh_scale` = inp/out before
    re-encrypting: free. Derived from the parameter set's primes and the Adam
    constants only, so participants and coordinator compute the same numbers.
    """

    inp: tuple[float, float, float]
    out: tuple[float, float, float]

    @classmethod
    def of(cls, be: Backend, hp: AdamHyper) -> StateUnits:
        """The factors for backend ``be`` (its rescale biases) and ``hp``."""
        top = be.top_level
        b_top, b_1, b_2 = (be.rescale_bias(top - i) for i in range(3))
        fx = be.gradient_factor  # x's factor: x·x carries factor 1
        kx = hp.m_coef  # m' = β1·m + kx·x
        f_r = R_SCALE / math.sqrt(b_top * b_1)  # r·r·W then carries R_SCALE²
        return cls(
            inp=(hp.beta1 * fx / kx, 1.0, f_r),
            out=(fx / kx, 1.0 / hp.beta2, f_r * R_SCALE**2 * b_2 / hp.s),
        )

    @staticmethod
    def levels(top: int) -> tuple[int, int, int]:
        """Where the refresher (and the round-1 key holder) encrypts m, V, r.

        The step uses m and V only one level below the top (m' = M + X and
        W = V + c²δ + X², both next to x·x), so they travel one level lower:
        smaller, cheaper to encrypt and to parse. r is squared at the top.
        """
        return top - 1, top - 1, top

    def refresh_scale(self, name: str) -> float:
        """What the refresher multiplies state ``name``'s decrypted values by."""
        j = "mVr".index(name)
        return self.inp[j] / self.out[j]


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
    h = hp.rsqrt_a - big_p
    r_new = s * r * h
    theta_new = theta + m_new * (-hp.a(t) * s * r) * h
    return theta_new, m_new, v_new, r_new


#: server optimisers that step on the plain mean x of the updates (participants
#: send w·clip(u, ±G), in θ's units): fedavg θ' = θ − lr·x (FedAvg at lr 1),
#: fedavgm M' = β1·M + x, θ' = θ − lr·M' (server momentum)
SUM_OPTIMIZERS = ("fedavg", "fedavgm")
#: every server optimiser; exact-adam runs on the plaintext twin only
OPTIMIZERS = ("he-adam", "exact-adam", *SUM_OPTIMIZERS)


def max_step(optimizer: str, hp: AdamHyper, bound: float, horizon: int = 64) -> float:
    """The largest |θ' − θ| per element one step can make when every update is
    clipped and weighted as participants do: Adam's :func:`step_sup` × lr, or
    for the sum optimisers lr × the largest mean of updates clipped to
    ±``bound`` (the largest G; k·x is a mean whatever the dropouts), summed
    over the momentum's geometric series."""
    if optimizer not in SUM_OPTIMIZERS:
        return step_sup(hp, horizon) * hp.lr
    series = 1.0 / (1.0 - hp.beta1) if optimizer == "fedavgm" else 1.0
    return hp.lr * bound * series


def twin_step(
    theta: np.ndarray,
    state: tuple[np.ndarray, np.ndarray, np.ndarray],
    x: np.ndarray,
    t: int,
    hp: AdamHyper,
    k: float,
    optimizer: str,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One step of the float64 twin: ``x`` the sum of the participants'
    ``c·w·clip(g)`` (without the backend's gradient factor), k = K/K'.

    ``he-adam`` is the circuit (:func:`circuit_reference` on k·x), ``exact-adam``
    Adam with an exact root in the same state convention
    (coordinator/he_adam.py's ``exact_step_chunk``).
    """
    m, v_big, r = state
    if optimizer in SUM_OPTIMIZERS:  # x = Σ w·clip(u, ±G), in θ's units
        # m as HE-Adam keeps it: m_coef × the momentum sum
        m = hp.beta1 * m + hp.m_coef * k * x
        step = m / hp.m_coef if optimizer == "fedavgm" else k * x
        return theta - hp.lr_at(t) * step, (m, v_big, r)
    if optimizer == "he-adam":
        theta, m, v_big, r = circuit_reference(theta, m, v_big, r, k * x, t, hp)
        return theta, (m, v_big, r)
    g = k * x / hp.c
    m = hp.beta1 * m + (1 - hp.beta1) * g
    v = hp.beta2 * v_big + (1 - hp.beta2) * (g * g + hp.delta)
    return theta - hp.a(t) * m / np.sqrt(v), (m, v, 1.0 / np.sqrt(v))
