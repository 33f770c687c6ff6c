"""PPO on one participant (docs/design.md#rl-side), plaintext only.

``participant-update = 'gradient'`` (PPO-FedSGD): each iteration the
participant collects a rollout with the current global θ; then for each of the
E×M rounds that follow it sends one fresh clipped-surrogate gradient, computed
at that round's θ on the next minibatch. ``'delta'``: every round it collects a
rollout at θ, runs all E×M minibatch updates locally with the local optimiser
and sends the pseudo-gradient Δ = θ − θ_local (:meth:`Learner.delta_step`).
The rollout buffer and the environments (pickled) live in the node's
``context.state`` between rounds, so a round that lands in a fresh process (in
deployment every message does) continues the same episodes; Box2D/MuJoCo envs
pickle as a replay of their current episode (:mod:`participants.replay`). A
process that handled the previous round reuses its live worker instead of
unpickling it (a per-process cache, checked against a token in the state).
"""

from __future__ import annotations

import functools
import logging
import pickle
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from participants.envs import make_envs
from participants.layout import Layout, init_params, make_layout
from participants.policy import ActorCritic
from participants.rollout import RolloutWorker, minibatches
from protocol.adam import SUM_OPTIMIZERS
from protocol.config import RunConfig
from protocol.errors import ConfigError
from protocol.packing import layout_digest

_BATCH_KEYS = ("obs", "actions", "logprobs", "advantages", "returns")
# live workers of this process: (token, worker) per run, env, seed and participant
_WORKERS: dict[tuple[Any, ...], tuple[str, RolloutWorker]] = {}
log = logging.getLogger("flwr.hedrl.participant")


@functools.lru_cache(maxsize=16)
def env_spec(env_id: str) -> tuple[int, int, bool]:
    """(observation dim, action dim, continuous) of a gymnasium environment."""
    env = gym.make(env_id)
    try:
        obs_dim = int(np.prod(env.observation_space.shape))
        space = env.action_space
        if isinstance(space, gym.spaces.Discrete):
            return obs_dim, int(space.n), False
        if isinstance(space, gym.spaces.Box):
            return obs_dim, int(np.prod(space.shape)), True
        raise ValueError(f"{env_id}: unsupported action space {space}")
    finally:
        env.close()


def layer_bounds(
    layout: Layout, clip_bound: float, rules: tuple[tuple[str, float], ...] = ()
) -> tuple[float, ...]:
    """Each tensor's clip bound G: the longest matching ``rules`` prefix, else
    ``clip_bound``. A prefix matches a dotted name component-wise ("actor.1"
    matches "actor.1.weight", not "actor.10.weight"); one that matches no
    tensor is a :class:`ConfigError`."""
    matched: set[str] = set()
    out = []
    for name in layout.names:
        bound = clip_bound
        for prefix, value in rules:  # longest first
            if name == prefix or name.startswith(prefix + "."):
                bound = value
                matched.add(prefix)
                break
        out.append(bound)
    unmatched = [prefix for prefix, _ in rules if prefix not in matched]
    if unmatched:
        raise ConfigError(
            f"layer-bounds: {unmatched} match no layer; layers: {list(layout.names)}"
        )
    return tuple(out)


def clip_and_scale(
    grad: np.ndarray, layout: Layout, bound: float | tuple[float, ...]
) -> np.ndarray:
    """Per-layer element-wise clip to ±G, divided by G: values in [−1, 1].

    ``bound`` is one G for every tensor or one per tensor (:func:`layer_bounds`).
    """
    bounds = (bound,) * len(layout.names) if np.isscalar(bound) else bound
    out = np.empty_like(grad)
    for (_, sl), g in zip(layout.slices(), bounds, strict=True):
        out[sl] = np.clip(grad[sl], -g, g) / g
    return out


class LocalOptimizer:
    """'delta' mode's optimiser of the local copy: ``local-optimizer`` 'sgd'
    (a step of local-lr·g) or 'adam' (β 0.9, 0.999, ε 1e-8, bias-corrected),
    after scaling g to a global norm of at most ``local-grad-norm`` (0: off)."""

    def __init__(self, cfg: RunConfig, size: int) -> None:
        self.kind, self.lr, self.max_norm = (
            cfg.local_optimizer,
            cfg.local_lr,
            cfg.local_grad_norm,
        )
        self.t, self.m, self.v = 0, np.zeros(size), np.zeros(size)

    def step(self, grad: np.ndarray) -> np.ndarray:
        """The change to subtract from the local parameters."""
        norm = float(np.linalg.norm(grad))
        if self.max_norm > 0 and norm > self.max_norm:
            grad = grad * (self.max_norm / norm)
        if self.kind == "sgd":
            return self.lr * grad
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * grad
        self.v = 0.999 * self.v + 0.001 * grad * grad
        m_hat, v_hat = self.m / (1 - 0.9**self.t), self.v / (1 - 0.999**self.t)
        return self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)


@dataclass
class _NodeState:
    worker: RolloutWorker
    batch: dict[str, np.ndarray] | None = None
    order: list[np.ndarray] = field(default_factory=list)
    pos: int = 0
    rollouts: int = 0
    # the worker's pickle as loaded; None once a rollout has changed the worker
    worker_bytes: bytes | None = None


GradientSource = Callable[
    ["Learner", np.ndarray, "bytes | None", object],
    tuple[np.ndarray, dict[str, Any], bytes],
]
"""Where a learner's gradients come from instead of its own PPO step:
``source(learner, theta, saved, cache_scope)``, which may call
``learner.ppo_step`` (benchmarks record gradients so, and replay them)."""


class Learner:
    """The participant's policy and its PPO state machine."""

    def __init__(
        self,
        cfg: RunConfig,
        index: int,
        gradients: GradientSource | None = None,
        salt: tuple[int, ...] = (),
    ) -> None:
        """``salt``: mixed into every rollout seed (a deployed participant's
        secret, :func:`participants.trust.rollout_salt`); θ0 stays the run's."""
        self.cfg = cfg
        self.index = index
        self.root = [cfg.seed, *salt]
        self.gradients = gradients
        obs_dim, act_dim, self.continuous = env_spec(cfg.env_id)
        self.layout = make_layout(obs_dim, act_dim, self.continuous, cfg.hidden)
        self.layout_digest = layout_digest(
            zip(self.layout.names, self.layout.shapes, strict=True)
        )
        self.policy = ActorCritic(self.layout, self.continuous)
        self.bounds = layer_bounds(self.layout, cfg.clip_bound, cfg.layer_bound_rules)

    def update_unit(self) -> np.ndarray:
        """Per element, what the normalised update clip(u, ±G)/G is sent as a
        multiple of: Adam's pre-scale c, or G itself for the server optimisers
        that step on the plain mean (:data:`protocol.adam.SUM_OPTIMIZERS`)."""
        if self.cfg.optimizer not in SUM_OPTIMIZERS:
            return np.full(self.layout.size, self.cfg.hyper.c)
        out = np.empty(self.layout.size)
        for (_, sl), g in zip(self.layout.slices(), self.bounds, strict=True):
            out[sl] = g
        return out

    def initial_theta(self) -> np.ndarray:
        """θ0 from the run's root seed (the same on every participant)."""
        return init_params(self.layout, np.random.default_rng([self.cfg.seed, 0]))

    def _new_state(self) -> _NodeState:
        env_seed = int(
            np.random.SeedSequence([*self.root, 1, self.index]).generate_state(1)[0]
        )
        envs = make_envs(
            self.cfg.env_id, self.cfg.num_envs, env_seed, self.cfg.reward_scale
        )
        return _NodeState(
            worker=RolloutWorker(
                envs, gamma=self.cfg.gamma, gae_lambda=self.cfg.gae_lambda
            )
        )

    def _load(self, saved: bytes | None, cache_key: tuple[Any, ...]) -> _NodeState:
        if not saved:
            return self._new_state()
        st = pickle.loads(saved)
        token, worker_bytes = st.pop("token"), st.pop("worker")
        cached = _WORKERS.get(cache_key)
        if cached is not None and cached[0] == token:
            worker = cached[1]  # this process ran the previous round: still live
        else:
            worker = pickle.loads(worker_bytes)
        return _NodeState(worker=worker, worker_bytes=worker_bytes, **st)

    def _save(self, st: _NodeState, cache_key: tuple[Any, ...]) -> bytes:
        token = secrets.token_hex(8)
        _WORKERS[cache_key] = (token, st.worker)
        rest = {f: getattr(st, f) for f in ("batch", "order", "pos", "rollouts")}
        worker = st.worker_bytes or pickle.dumps(st.worker)
        return pickle.dumps({**rest, "token": token, "worker": worker})

    def step(
        self, theta: np.ndarray, saved: bytes | None, cache_scope: object = None
    ) -> tuple[np.ndarray, dict[str, Any], bytes]:
        """One round's update at ``theta``: (gradient or Δ, env stats, new saved
        state), from the injected gradient source if there is one."""
        if self.gradients is not None:
            return self.gradients(self, theta, saved, cache_scope)
        if self.cfg.participant_update == "delta":
            return self.delta_step(theta, saved, cache_scope)
        return self.ppo_step(theta, saved, cache_scope)

    def _rollout(
        self, st: _NodeState, theta: np.ndarray
    ) -> tuple[dict[str, np.ndarray], list[np.ndarray], dict[str, Any]]:
        """A rollout at ``theta``: (batch, the E×M minibatch indices, stats)."""
        cfg = self.cfg
        rng = np.random.default_rng([*self.root, 2, self.index, st.rollouts])
        batch, returns, _lengths, steps = st.worker.collect(
            self.policy, theta, cfg.num_steps, rng
        )
        size = len(batch["obs"])
        order = [
            idx
            for epoch in range(cfg.update_epochs)
            for idx in minibatches(
                size,
                cfg.num_minibatches,
                np.random.default_rng([*self.root, 3, self.index, st.rollouts, epoch]),
            )
        ]
        st.worker_bytes, st.rollouts = None, st.rollouts + 1
        stats = {
            "episodes": len(returns),
            "return_sum": float(np.sum(returns)),
            "env_steps": int(steps),
        }
        return batch, order, stats

    def _grad(
        self, theta: np.ndarray, batch: dict[str, np.ndarray], idx: np.ndarray
    ) -> tuple[np.ndarray, dict[str, float]]:
        cfg = self.cfg
        mb = {k: batch[k][idx] for k in _BATCH_KEYS}
        _, grad, info = self.policy.loss_and_grad(
            theta, mb, cfg.clip_coef, cfg.vf_coef, cfg.ent_coef
        )
        return grad, info

    def delta_step(
        self, theta: np.ndarray, saved: bytes | None, cache_scope: object = None
    ) -> tuple[np.ndarray, dict[str, Any], bytes]:
        """'delta' mode: a rollout at ``theta``, then E×M PPO minibatch updates
        of a local copy with the local optimiser (fresh each round);
        (Δ = θ − θ_local, env stats, new saved state)."""
        cache_key = (cache_scope, self.cfg.env_id, self.cfg.seed, self.index)
        st = self._load(saved, cache_key)
        batch, order, stats = self._rollout(st, theta)
        local = np.array(theta, dtype=np.float64)
        opt = LocalOptimizer(self.cfg, local.size)
        for idx in order:
            grad, info = self._grad(local, batch, idx)
            local -= opt.step(grad)
        stats.update({f"train/{k}": float(v) for k, v in info.items()})
        return theta - local, stats, self._save(st, cache_key)

    def ppo_step(
        self, theta: np.ndarray, saved: bytes | None, cache_scope: object = None
    ) -> tuple[np.ndarray, dict[str, Any], bytes]:
        """One PPO minibatch gradient at ``theta`` (a rollout first, every E×M)."""
        cache_key = (cache_scope, self.cfg.env_id, self.cfg.seed, self.index)
        st = self._load(saved, cache_key)
        stats: dict[str, Any] = {"episodes": 0, "return_sum": 0.0, "env_steps": 0}
        if st.batch is None or st.pos >= len(st.order):
            st.batch, st.order, stats = self._rollout(st, theta)
            st.pos = 0
        grad, info = self._grad(theta, st.batch, st.order[st.pos])
        st.pos += 1
        stats.update({f"train/{k}": float(v) for k, v in info.items()})
        return grad, stats, self._save(st, cache_key)
