"""Carry the state of an env whose pickle loses it (Box2D, MuJoCo) by replay.

``EzPickle`` envs such as LunarLander pickle only their constructor arguments:
an unpickled copy is a fresh, un-reset env. In deployment every message is a
fresh ClientApp process, so a participant's episodes would restart at every
rollout. :class:`EpisodeReplay` records how the current episode began (the reset
seed, or the env's RNG state just before an unseeded reset) and every action
since; its pickle is that record, and an unpickled copy rebuilds the env with
``gym.make``, resets it from the record and replays the actions the first time
it is used. Box2D is deterministic for the same build, start and actions (the
engine's dispersion noise comes from the env's own RNG, which the replay
restores too); a test checks a copy in a fresh process continues identically.
A replay costs ~60 µs per step, at most one episode (LunarLander: ≤ 1000 steps).
"""

from __future__ import annotations

import copy
from typing import Any

import gymnasium as gym
import numpy as np


class EpisodeReplay(gym.Wrapper):
    """Picklable wrapper that rebuilds its env by replaying the current episode.

    Parameters
    ----------
    env_id : str
        Gymnasium id, rebuilt with ``gym.make(env_id, **make_kwargs)``.
    make_kwargs : dict, optional
        Extra ``gym.make`` arguments (e.g. ``render_mode``).
    """

    def __init__(self, env_id: str, make_kwargs: dict[str, Any] | None = None):
        self._env_id = env_id
        self._make_kwargs = dict(make_kwargs or {})
        super().__init__(gym.make(env_id, **self._make_kwargs))
        self._start: tuple[str, Any, dict[str, Any] | None] | None = None
        self._actions: list[Any] = []
        self._pending = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Reset, remembering how this episode starts."""
        self._catch_up()
        if seed is not None:
            self._start = ("seed", int(seed), copy.deepcopy(options))
        else:
            state = self.env.unwrapped.np_random.bit_generator.state
            self._start = ("rng", copy.deepcopy(state), copy.deepcopy(options))
        self._actions = []
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        """Step, remembering the action."""
        self._catch_up()
        self._actions.append(copy.deepcopy(action))
        return self.env.step(action)

    def _catch_up(self) -> None:
        """After unpickling: reset from the record and replay its actions."""
        if not self._pending:
            return
        self._pending = False
        if self._start is None:
            return
        kind, value, options = self._start
        if kind == "seed":
            self.env.reset(seed=value, options=options)
        else:
            self.env.unwrapped.np_random = np.random.Generator(np.random.PCG64())
            self.env.unwrapped.np_random.bit_generator.state = copy.deepcopy(value)
            self.env.reset(options=options)
        for action in self._actions:
            self.env.step(action)

    @property
    def replay_length(self) -> int:
        """Actions a restored copy replays (those since the episode began)."""
        return len(self._actions)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "env_id": self._env_id,
            "make_kwargs": self._make_kwargs,
            "start": self._start,
            "actions": self._actions,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["env_id"], state["make_kwargs"])  # type: ignore[misc]
        self._start = state["start"]
        self._actions = list(state["actions"])
        self._pending = True
