"""The participant's gymnasium envs: vector env, episode statistics, scaling.

Environments run in a :class:`gymnasium.vector.SyncVectorEnv` with
``AutoresetMode.SAME_STEP``: a sub-env that ends is reset inside the same
``step`` call and its last observation arrives in ``infos["final_obs"]``.
Episode statistics come from :class:`gymnasium.wrappers.vector.RecordEpisodeStatistics`
(raw environment returns); reward and observation scaling sit outside it and only
affect learning. Envs whose pickle loses their state are wrapped in
:class:`participants.replay.EpisodeReplay`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.spaces import Box
from gymnasium.utils import EzPickle
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv, VectorWrapper
from gymnasium.wrappers.vector import RecordEpisodeStatistics

from participants.replay import EpisodeReplay

MAX_SCALED_SPAN = 1e6
"""Observation dims whose ``high - low`` is at least this pass through unscaled."""


class ScaleForLearning(VectorWrapper):
    """Scale observations to [-1, 1] (finite-bound dims) and rewards by a constant.

    Unlike gymnasium's ``VectorObservationWrapper`` (which refuses SAME_STEP
    autoreset) this also scales ``infos["final_obs"]``, the observation that
    truncated episodes bootstrap from.

    Parameters
    ----------
    env : VectorEnv
        Vector env whose single observation space is a ``Box``.
    reward_scale : float
        Rewards are multiplied by this.
    obs_scaling : bool, default True
        Map dims with finite bounds ``[low, high]`` affinely onto ``[-1, 1]``;
        dims with an infinite bound pass through unchanged.
    """

    def __init__(self, env: VectorEnv, reward_scale: float, obs_scaling: bool = True):
        super().__init__(env)
        space = env.single_observation_space
        if not isinstance(space, Box):
            raise TypeError(f"expected a Box observation space, got {space}")
        raw_low, raw_high = space.low.astype(np.float64), space.high.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            span = raw_high - raw_low
        # float32-max "bounds" (older CartPole) count as unbounded, not as scale 1e38
        finite = np.isfinite(span) & (span > 0.0) & (span < MAX_SCALED_SPAN)
        if not obs_scaling:
            finite[...] = False
        self.reward_scale = float(reward_scale)
        low, high = np.where(finite, raw_low, -1.0), np.where(finite, raw_high, 1.0)
        self._center = (high + low) / 2.0  # 0 where the dim passes through
        self._half_range = (high - low) / 2.0  # 1 where the dim passes through
        self.single_observation_space = Box(
            np.where(finite, -1.0, raw_low),
            np.where(finite, 1.0, raw_high),
            dtype=np.float64,
        )
        self.observation_space = gym.vector.utils.batch_space(
            self.single_observation_space, env.num_envs
        )
        self.last_obs: np.ndarray | None = None
        """Most recent scaled observations from ``reset`` or ``step``."""

    def scale_obs(self, obs: np.ndarray) -> np.ndarray:
        """Map raw observations (any leading shape) to learning units."""
        return (np.asarray(obs, dtype=np.float64) - self._center) / self._half_range

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset and scale the first observations."""
        obs, infos = self.env.reset(seed=seed, options=options)
        self.last_obs = self.scale_obs(obs)
        return self.last_obs, infos

    def step(
        self, actions: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step, scaling observations, ``final_obs`` and rewards."""
        obs, rewards, terminations, truncations, infos = self.env.step(actions)
        if "final_obs" in infos:
            final = np.empty_like(infos["final_obs"])
            for i in np.flatnonzero(infos["_final_obs"]):
                final[i] = self.scale_obs(infos["final_obs"][i])
            infos = {**infos, "final_obs": final}
        rewards = np.asarray(rewards, dtype=np.float64) * self.reward_scale
        self.last_obs = self.scale_obs(obs)
        return self.last_obs, rewards, terminations, truncations, infos


def _make_one(env_id: str, extra: dict[str, Any]) -> gym.Env:
    """``gym.make``; envs whose pickle loses their state get :class:`EpisodeReplay`."""
    env = gym.make(env_id, **extra)
    if isinstance(env.unwrapped, EzPickle):
        env.close()
        return EpisodeReplay(env_id, extra)
    return env


def make_envs(
    env_id: str,
    num_envs: int,
    seed: int,
    reward_scale: float,
    obs_scaling: bool = True,
    render_mode: str | None = None,
) -> ScaleForLearning:
    """Build ``SyncVectorEnv(SAME_STEP)``, ``RecordEpisodeStatistics``, scaling.

    The wrappers nest in that order, so episode statistics are raw returns.

    Parameters
    ----------
    env_id : str
        Gymnasium id, e.g. ``"CartPole-v1"``.
    num_envs : int
        Number of sub-environments.
    seed : int
        Sub-env ``i`` is reset once with ``seed + i`` (gymnasium's vector rule).
    reward_scale : float
        Learning-only reward factor; episode statistics stay raw.
    obs_scaling : bool, default True
        Scale finite-bound observation dims to ``[-1, 1]``.
    render_mode : str or None, default None
        Passed to ``gym.make`` (``"rgb_array"`` to record frames in evaluation).

    Returns
    -------
    ScaleForLearning
        The wrapped env, already reset once with ``seed``; its first
        observations are in ``last_obs``.
    """
    extra = {} if render_mode is None else {"render_mode": render_mode}
    envs = SyncVectorEnv(
        [partial(_make_one, env_id, extra) for _ in range(num_envs)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    wrapped = ScaleForLearning(RecordEpisodeStatistics(envs), reward_scale, obs_scaling)
    wrapped.reset(seed=seed)
    return wrapped
