"""Gymnasium vector-env rollouts and PPO data for one participant.

The envs come from :func:`participants.envs.make_envs` (SAME_STEP autoreset): a
sub-env that ends is reset inside the same ``step`` call and its last
observation arrives in ``infos["final_obs"]``. So a truncated (time-limit)
episode is bootstrapped from ``V(final_obs)``, a terminated one is not, and no
transition needs masking. Episode returns are read from
``infos["episode"]["r"]`` under the mask ``infos["_episode"]``. GAE follows
Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
Advantage Estimation" (arXiv:1506.02438).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np
from gymnasium.spaces import Box
from gymnasium.utils import EzPickle

from participants.envs import ScaleForLearning, make_envs
from participants.replay import EpisodeReplay
from protocol.config import RunConfig

__all__ = [
    "Policy",
    "Rollout",
    "RolloutWorker",
    "compute_gae",
    "make_envs",
    "minibatches",
    "take",
]


class Policy(Protocol):
    """What a rollout needs from a policy, e.g. ``participants.policy.ActorCritic``."""

    def act(
        self, theta: np.ndarray, obs: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def value(self, theta: np.ndarray, obs: np.ndarray) -> np.ndarray: ...


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    next_values: np.ndarray,
    dones: np.ndarray,
    gamma: float,
    gae_lambda: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimates over a ``[T, N]`` rollout.

    Parameters
    ----------
    rewards, values : np.ndarray
        ``r_t`` and ``V(s_t)``, shape ``[T, N]``.
    next_values : np.ndarray
        Bootstrap value of the state after step ``t``: ``V(s_{t+1})`` while the
        episode goes on, ``V(final_obs)`` on truncation, 0 on termination.
    dones : np.ndarray
        ``terminated | truncated`` at step ``t``; stops the GAE recursion.
    gamma, gae_lambda : float
        Discount and GAE lambda.

    Returns
    -------
    advantages, returns : np.ndarray
        Shape ``[T, N]``; ``returns = advantages + values``.
    """
    deltas = rewards + gamma * next_values - values
    advantages = np.zeros_like(deltas)
    last = np.zeros(deltas.shape[1])
    for t in reversed(range(deltas.shape[0])):
        last = deltas[t] + gamma * gae_lambda * (1.0 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values


class Rollout(NamedTuple):
    """Result of :meth:`RolloutWorker.collect` (unpacks as a 4-tuple)."""

    batch: dict[str, np.ndarray]
    episode_returns: list[float]
    episode_lengths: list[int]
    env_steps: int


class RolloutWorker:
    """A participant's envs and current observations; picklable between rounds.

    Parameters
    ----------
    envs : ScaleForLearning
        From :func:`make_envs`, already seeded; rollouts continue from its
        ``last_obs``.
    gamma, gae_lambda : float
        Discount and GAE lambda.
    """

    def __init__(
        self, envs: ScaleForLearning, *, gamma: float, gae_lambda: float
    ) -> None:
        if envs.last_obs is None:
            raise ValueError("envs must be reset (seeded) before building a worker")
        self.envs = envs
        self.gamma = gamma
        self.gae_lambda = gae_lambda
        self.obs: np.ndarray = envs.last_obs
        space = envs.single_action_space
        self._bounds = (space.low, space.high) if isinstance(space, Box) else None

    def __getstate__(self) -> dict[str, Any]:
        """Refuse envs whose pickle does not carry their state (fail closed).

        ``EzPickle`` envs (Box2D, MuJoCo) pickle only their constructor
        arguments, so an unpickled copy would not continue the same episodes
        (LunarLander even segfaults on the next step); :func:`make_envs` wraps
        them in :class:`EpisodeReplay`, whose pickle replays the episode.
        """
        for env in self.envs.unwrapped.envs:  # type: ignore[attr-defined]
            if isinstance(env.unwrapped, EzPickle) and not isinstance(
                env, EpisodeReplay
            ):
                raise TypeError(
                    f"{env.spec.id if env.spec else env}: EzPickle env state does not "
                    "survive pickling; build it with make_envs (EpisodeReplay)"
                )
        return self.__dict__.copy()

    @classmethod
    def create(
        cls, env_id: str, seed: int, config: RunConfig, obs_scaling: bool = True
    ) -> RolloutWorker:
        """Build ``config.num_envs`` envs with :func:`make_envs` and a worker
        with the config's γ and λ."""
        envs = make_envs(
            env_id, config.num_envs, seed, config.reward_scale, obs_scaling
        )
        return cls(envs, gamma=config.gamma, gae_lambda=config.gae_lambda)

    def collect(
        self,
        policy: Policy,
        theta: np.ndarray,
        num_steps: int,
        rng: np.random.Generator,
    ) -> Rollout:
        """Run ``num_steps`` vector steps with ``theta`` and compute GAE.

        Returns
        -------
        Rollout
            ``batch`` holds flat ``[num_steps * num_envs, ...]`` arrays ``obs``,
            ``actions`` (unclipped), ``logprobs``, ``advantages``, ``returns``,
            ``values``; then raw returns/lengths of the episodes that ended, and
            the number of env steps taken.
        """
        n = self.obs.shape[0]
        obs = np.zeros((num_steps, *self.obs.shape))
        rewards, values, next_values, dones, logprobs = (
            np.zeros((num_steps, n)) for _ in range(5)
        )
        actions: list[np.ndarray] = []
        ep_returns: list[float] = []
        ep_lengths: list[int] = []
        for t in range(num_steps):
            obs[t] = self.obs
            action, logprobs[t], values[t] = policy.act(theta, self.obs, rng)
            actions.append(action)
            env_action = (
                action if self._bounds is None else np.clip(action, *self._bounds)
            )
            self.obs, rewards[t], terminated, truncated, infos = self.envs.step(
                env_action
            )
            dones[t] = terminated | truncated
            bootstrap = np.flatnonzero(truncated & ~terminated)
            if bootstrap.size:
                final = np.stack([infos["final_obs"][i] for i in bootstrap])
                next_values[t, bootstrap] = policy.value(theta, final)
            if "_episode" in infos:
                mask = infos["_episode"]
                ep_returns += [float(r) for r in infos["episode"]["r"][mask]]
                ep_lengths += [int(k) for k in infos["episode"]["l"][mask]]
        following = np.concatenate([values[1:], policy.value(theta, self.obs)[None]])
        next_values = np.where(dones > 0, next_values, following)
        advantages, returns = compute_gae(
            rewards, values, next_values, dones, self.gamma, self.gae_lambda
        )
        batch = {
            "obs": obs.reshape(num_steps * n, -1),
            "actions": np.stack(actions).reshape(num_steps * n, *actions[0].shape[1:]),
            "logprobs": logprobs.reshape(-1),
            "advantages": advantages.reshape(-1),
            "returns": returns.reshape(-1),
            "values": values.reshape(-1),
        }
        return Rollout(batch, ep_returns, ep_lengths, num_steps * n)


def minibatches(
    batch_size: int, num_minibatches: int, epoch_rng: np.random.Generator
) -> list[np.ndarray]:
    """Split a random permutation of ``range(batch_size)`` into equal minibatches."""
    if num_minibatches < 1 or batch_size % num_minibatches:
        raise ValueError(
            f"batch_size {batch_size} is not divisible into "
            f"{num_minibatches} minibatches"
        )
    return np.split(epoch_rng.permutation(batch_size), num_minibatches)


def take(batch: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """Select rows ``index`` of every array in ``batch``."""
    return {key: value[index] for key, value in batch.items()}
