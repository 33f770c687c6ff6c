"""Numpy actor-critic with analytic gradients for PPO.

Separate actor and critic MLPs (tanh hidden layers, orthogonal init as in CleanRL's
``ppo.py``) with a categorical or diagonal-Gaussian head. Every parameter lives in
one flat float64 vector ``theta`` whose layout is described by :class:`Layout`;
gradients are computed by hand-written backpropagation into a vector of the same
layout, so the result can be clipped per layer, scaled and encrypted as one array.

The PPO loss follows Schulman et al. 2017, "Proximal Policy Optimization
Algorithms" (arXiv:1707.06347) in the form used by CleanRL: advantages normalised
per minibatch, clipped surrogate, unclipped value loss ``0.5 * (v - ret)**2``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from participants.layout import Layout, init_params, make_layout

__all__ = ["ActorCritic", "Layout", "init_params", "make_layout"]

# The policy's matrices are tiny (minibatch × 64): BLAS threads only add
# synchronisation, and next to other busy processes (K participants, the
# coordinator) OpenBLAS's spinning threads made one 256×64 backward pass 48 ms
# instead of 0.6 ms on the 2-core dev machine (measured). One thread per process.
threadpool_limits(limits=1, user_api="blas")

LOG_2PI = float(np.log(2.0 * np.pi))
ADV_EPS = 1e-8  # added to the advantage std, as in CleanRL

PolicyLoss = tuple[float, np.ndarray, dict[str, float]]
"""Policy loss, its gradient w.r.t. each sample's log-prob, extra stats."""
PolicyTerms = Callable[[np.ndarray], PolicyLoss]


def _mlp_forward(
    weights: list[np.ndarray], biases: list[np.ndarray], x: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Tanh MLP with a linear output; also return each layer's input."""
    inputs = []
    h = x
    for j, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inputs.append(h)
        h = h @ w.T + b
        if j < len(weights) - 1:
            h = np.tanh(h)
    return h, inputs


def _mlp_backward(
    weights: list[np.ndarray],
    inputs: list[np.ndarray],
    d_out: np.ndarray,
    grad_w: list[np.ndarray],
    grad_b: list[np.ndarray],
) -> None:
    """Backpropagate ``d_out`` through the MLP, writing into the gradient views."""
    d = d_out
    for j in reversed(range(len(weights))):
        grad_w[j][...] = d.T @ inputs[j]
        grad_b[j][...] = d.sum(axis=0)
        if j > 0:  # inputs[j] = tanh(pre-activation of layer j - 1)
            d = (d @ weights[j]) * (1.0 - inputs[j] ** 2)


def _normalise(advantages: np.ndarray) -> np.ndarray:
    """Per-minibatch advantage normalisation (unbiased std, as ``torch.std``)."""
    if advantages.shape[0] < 2:
        raise ValueError(
            f"advantage normalisation needs a minibatch of >= 2, got {advantages.shape}"
        )
    return (advantages - advantages.mean()) / (advantages.std(ddof=1) + ADV_EPS)


class ActorCritic:
    """Stateless actor-critic evaluated at an explicit flat parameter vector.

    Parameters
    ----------
    layout : Layout
        Built by :func:`make_layout`; fixes ``obs_dim``, ``act_dim`` and depth.
    continuous : bool
        Gaussian head with state-independent ``actor.logstd`` if True, else
        categorical over ``act_dim`` actions.
    """

    def __init__(self, layout: Layout, continuous: bool) -> None:
        if continuous != ("actor.logstd" in layout.names):
            raise ValueError(
                f"continuous={continuous} does not match layout "
                f"(has actor.logstd: {'actor.logstd' in layout.names})"
            )
        self.layout = layout
        self.continuous = continuous
        shapes = dict(zip(layout.names, layout.shapes, strict=True))
        self.n_layers = sum(
            1 for n in layout.names if n.startswith("actor.") and n.endswith(".weight")
        )
        self.obs_dim = shapes["actor.0.weight"][1]
        self.act_dim = shapes[f"actor.{self.n_layers - 1}.weight"][0]

    def _net(
        self, p: dict[str, np.ndarray], net: str
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Weights and biases of ``net`` ("actor" or "critic"), input layer first."""
        layers = range(self.n_layers)
        weights = [p[f"{net}.{j}.weight"] for j in layers]
        return weights, [p[f"{net}.{j}.bias"] for j in layers]

    def value(self, theta: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """Critic value of a batch of observations, shape ``[B]``."""
        weights, biases = self._net(self.layout.views(theta), "critic")
        out, _ = _mlp_forward(weights, biases, np.asarray(obs, dtype=np.float64))
        return out[:, 0]

    def act(
        self, theta: np.ndarray, obs: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample actions for a batch ``obs`` of shape ``[B, obs_dim]``.

        Returns
        -------
        actions : np.ndarray
            ``int64 [B]`` (categorical) or unclipped ``float64 [B, act_dim]``.
        logprob : np.ndarray
            ``[B]`` log-probability of the sampled actions (summed over dims).
        value : np.ndarray
            ``[B]`` critic values.
        """
        obs = np.asarray(obs, dtype=np.float64)
        p = self.layout.views(theta)
        out, _ = _mlp_forward(*self._net(p, "actor"), obs)
        if self.continuous:
            std = np.exp(p["actor.logstd"])
            actions = out + std * rng.standard_normal(out.shape)
        else:
            probs = np.exp(out - out.max(axis=1, keepdims=True))
            cdf = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
            u = rng.random((obs.shape[0], 1))
            actions = np.minimum((cdf < u).sum(axis=1), self.act_dim - 1)
        logprob, _, _ = self._head(p, out, actions)
        return actions, logprob, self.value(theta, obs)

    def _head(
        self, p: dict[str, np.ndarray], out: np.ndarray, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Log-probabilities ``[B]``, entropies ``[B]`` and a backward cache."""
        if self.continuous:
            logstd = p["actor.logstd"]
            z = (np.asarray(actions, dtype=np.float64) - out) / np.exp(logstd)
            logprob = (-0.5 * z**2 - logstd - 0.5 * LOG_2PI).sum(axis=1)
            entropy = np.full(out.shape[0], (0.5 + 0.5 * LOG_2PI + logstd).sum())
            return logprob, entropy, {"z": z, "std": np.exp(logstd)}
        shifted = out - out.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        probs = np.exp(log_p)
        onehot = np.zeros_like(out)
        onehot[np.arange(out.shape[0]), np.asarray(actions, dtype=np.int64)] = 1.0
        logprob = (log_p * onehot).sum(axis=1)
        entropy = -(probs * log_p).sum(axis=1)
        return logprob, entropy, {"log_p": log_p, "probs": probs, "onehot": onehot}

    def _head_backward(
        self,
        cache: dict[str, np.ndarray],
        entropy: np.ndarray,
        g_logp: np.ndarray,
        g_ent: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Gradient w.r.t. the actor output (and ``logstd``) from ``dL/dlogp``."""
        if self.continuous:
            z, std = cache["z"], cache["std"]
            d_out = g_logp[:, None] * z / std
            d_logstd = (g_logp[:, None] * (z**2 - 1.0)).sum(axis=0) + g_ent.sum()
            return d_out, d_logstd
        log_p, probs = cache["log_p"], cache["probs"]
        d_ent = -probs * (log_p + entropy[:, None])
        d_out = g_logp[:, None] * (cache["onehot"] - probs) + g_ent[:, None] * d_ent
        return d_out, None

    def _loss_and_grad(
        self,
        theta: np.ndarray,
        mb: dict[str, np.ndarray],
        vf_coef: float,
        ent_coef: float,
        policy_terms: PolicyTerms,
    ) -> tuple[float, np.ndarray, dict[str, float]]:
        """Forward, loss and backward for a policy loss (PPO's clipped surrogate).

        ``policy_terms`` maps the minibatch log-probs to the policy loss, its
        gradient w.r.t. each log-prob and extra stats; the value loss
        ``0.5 * mean((v - ret)**2)`` and the entropy bonus are added here.
        """
        p = self.layout.views(theta)
        obs = np.asarray(mb["obs"], dtype=np.float64)
        returns = np.asarray(mb["returns"], dtype=np.float64)
        n = obs.shape[0]
        actor_w, actor_b = self._net(p, "actor")
        critic_w, critic_b = self._net(p, "critic")
        out, actor_in = _mlp_forward(actor_w, actor_b, obs)
        v_out, critic_in = _mlp_forward(critic_w, critic_b, obs)
        logprob, entropy, cache = self._head(p, out, mb["actions"])
        pg_loss, g_logp, stats = policy_terms(logprob)
        value_err = v_out[:, 0] - returns
        v_loss = 0.5 * float((value_err**2).mean())
        ent = float(entropy.mean())
        loss = pg_loss - ent_coef * ent + vf_coef * v_loss

        grad = np.zeros(self.layout.size)
        g = self.layout.views(grad)
        g_ent = np.full(n, -ent_coef / n)
        d_out, d_logstd = self._head_backward(cache, entropy, g_logp, g_ent)
        _mlp_backward(actor_w, actor_in, d_out, *self._net(g, "actor"))
        d_value = (vf_coef / n) * value_err[:, None]
        _mlp_backward(critic_w, critic_in, d_value, *self._net(g, "critic"))
        if d_logstd is not None:
            g["actor.logstd"][...] = d_logstd
        return (
            loss,
            grad,
            {"pg_loss": pg_loss, "v_loss": v_loss, "entropy": ent, **stats},
        )

    def loss_and_grad(
        self,
        theta: np.ndarray,
        mb: dict[str, np.ndarray],
        clip_coef: float,
        vf_coef: float,
        ent_coef: float,
    ) -> tuple[float, np.ndarray, dict[str, float]]:
        """PPO clipped-surrogate loss and its gradient w.r.t. ``theta``.

        Parameters
        ----------
        theta : np.ndarray
            Flat parameters, shape ``[layout.size]``.
        mb : dict of np.ndarray
            ``obs``, ``actions``, ``logprobs`` (behaviour policy), ``advantages``,
            ``returns``; all with leading dimension ``B >= 2``.
        clip_coef, vf_coef, ent_coef : float
            Surrogate clip range, value-loss and entropy coefficients.

        Returns
        -------
        loss : float
            ``pg_loss - ent_coef * entropy + vf_coef * v_loss``.
        grad : np.ndarray
            ``d loss / d theta``, same layout as ``theta``.
        stats : dict of float
            ``pg_loss``, ``v_loss``, ``entropy``, ``approx_kl``, ``clipfrac``.
        """
        adv = _normalise(np.asarray(mb["advantages"], dtype=np.float64))
        old_logprob = np.asarray(mb["logprobs"], dtype=np.float64)

        def clipped_surrogate(logprob: np.ndarray) -> PolicyLoss:
            logratio = logprob - old_logprob
            ratio = np.exp(logratio)
            pg1 = -adv * ratio
            pg2 = -adv * np.clip(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
            # d(-adv * ratio)/dlogprob = -adv * ratio; the clipped branch is flat
            g_logp = np.where(pg1 >= pg2, pg1, 0.0) / adv.shape[0]
            stats = {
                "approx_kl": float(((ratio - 1.0) - logratio).mean()),
                "clipfrac": float((np.abs(ratio - 1.0) > clip_coef).mean()),
            }
            return float(np.maximum(pg1, pg2).mean()), g_logp, stats

        return self._loss_and_grad(theta, mb, vf_coef, ent_coef, clipped_surrogate)
