"""HE-Adam's public constants, shared by participants (pre-scaling) and coordinator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdamHyper:
    """Public HE-Adam constants (ARCHITECTURE §6)."""

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

    @property
    def c(self) -> float:
        """Gradient pre-scale sqrt((1−β2)/β2): participants send c·w·g."""
        return math.sqrt((1 - self.beta2) / self.beta2)

    @property
    def s(self) -> float:
        """Newton warm-start constant β2^(−1/2)/2."""
        return 0.5 / math.sqrt(self.beta2)

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


def initial_state(
    squares_mean: np.ndarray, hp: AdamHyper
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """m0 = 0, V0 = mean g² + δ and r0 = V0^(−1/2) (computed by a key holder)."""
    v0 = np.asarray(squares_mean, dtype=np.float64) + hp.delta
    return np.zeros_like(v0), v0, 1.0 / np.sqrt(v0)
