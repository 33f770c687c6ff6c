"""Tests for vector-env rollouts: episode stats, GAE, scaling, pickling."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.spaces import Box, Discrete

from participants.policy import ActorCritic, init_params, make_layout
from participants.rollout import (
    RolloutWorker,
    compute_gae,
    make_envs,
    minibatches,
    take,
)
from protocol.config import RunConfig
from protocol.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TOY_ID = "HedrlToy-v0"


class ToyEnv(gym.Env):
    """Counter ``k`` in [0, 10], reward 1 per step; odd episodes terminate at k == 2.

    Registered with ``max_episode_steps=3``, so even episodes are truncated at k == 3.
    """

    observation_space = Box(0.0, 10.0, (1,), np.float32)
    action_space = Discrete(2)

    def __init__(self) -> None:
        self.episode, self.k = -1, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.episode, self.k = self.episode + 1, 0
        return np.array([self.k], np.float32), {}

    def step(self, action):
        self.k += 1
        terminated = self.episode % 2 == 1 and self.k == 2
        return np.array([self.k], np.float32), 1.0, terminated, False, {}


if TOY_ID not in gym.registry:
    gym.register(id=TOY_ID, entry_point=ToyEnv, max_episode_steps=3)


class CounterValuePolicy:
    """Stub policy: action 0, log-prob 0, ``V = 10 * k`` read from scaled obs."""

    def value(self, theta: np.ndarray, obs: np.ndarray) -> np.ndarray:
        k = 5.0 * obs[:, 0] + 5.0  # obs scaled from [0, 10] to [-1, 1]
        return 10.0 * k

    def act(self, theta: np.ndarray, obs: np.ndarray, rng: np.random.Generator):
        n = obs.shape[0]
        return np.zeros(n, np.int64), np.zeros(n), self.value(theta, obs)


def _cartpole(seed: int) -> tuple[RolloutWorker, ActorCritic, np.ndarray]:
    layout = make_layout(4, 2, continuous=False)
    theta = init_params(layout, np.random.default_rng(seed))
    worker = RolloutWorker.create("CartPole-v1", seed, RunConfig(num_envs=4))
    return worker, ActorCritic(layout, continuous=False), theta


def _policy_for(worker: RolloutWorker) -> tuple[ActorCritic, np.ndarray]:
    """An initial discrete-action policy sized for ``worker``'s envs (seed 0)."""
    obs_dim = worker.envs.single_observation_space.shape[0]
    layout = make_layout(obs_dim, int(worker.envs.single_action_space.n), False)
    return ActorCritic(layout, continuous=False), init_params(
        layout, np.random.default_rng(0)
    )


def test_cartpole_episode_statistics_are_recorded() -> None:
    """Initial-policy CartPole episodes are counted, raw returns equal lengths."""
    worker, policy, theta = _cartpole(seed=0)
    stats = worker.envs.env  # RecordEpisodeStatistics, below the reward scaling
    rollout = worker.collect(policy, theta, 128, np.random.default_rng(0))
    assert rollout.env_steps == 4 * 128
    assert len(rollout.episode_returns) >= 8  # near-uniform policy: ~20-step episodes
    assert max(rollout.episode_lengths) < 100
    assert rollout.episode_returns == [float(n) for n in rollout.episode_lengths]
    # every step is in a finished episode or in one still running (SAME_STEP)
    assert sum(rollout.episode_lengths) + stats.episode_lengths.sum() == 4 * 128
    # rewards used for learning are scaled by 0.1; returns bootstrap below 1/(1-g)
    assert np.all(rollout.batch["returns"] < 0.1 / (1 - 0.99) + 1e-9)


def test_gae_hand_computed_with_truncation_bootstrap() -> None:
    """Worker GAE on the toy env matches a hand computation (truncation + termination).

    Steps k: 1, 2, 3 (truncated: bootstrap V(final k=3)=30), 1, 2 (terminated:
    no bootstrap), 1 (rollout end: bootstrap V(k=1)=10). r = 0.5 (scale 0.5),
    V(k) = 10k, gamma = lambda = 0.5. deltas = r + gamma * V' - V:
    5.5, 0.5, -4.5, 5.5, -9.5, 5.5; A_t = delta_t + 0.25 * (1 - done_t) * A_{t+1}.
    """
    envs = make_envs(TOY_ID, num_envs=1, seed=0, reward_scale=0.5)
    worker = RolloutWorker(envs, gamma=0.5, gae_lambda=0.5)
    rollout = worker.collect(CounterValuePolicy(), np.zeros(1), 6, None)
    expected_adv = [5.34375, -0.625, -4.5, 3.125, -9.5, 5.5]
    values = [0.0, 10.0, 20.0, 0.0, 10.0, 0.0]
    assert np.allclose(rollout.batch["values"], values, rtol=0, atol=1e-12)
    assert np.allclose(rollout.batch["advantages"], expected_adv, rtol=0, atol=1e-12)
    assert np.allclose(
        rollout.batch["returns"], np.add(expected_adv, values), rtol=0, atol=1e-12
    )
    assert rollout.episode_returns == [3.0, 2.0]  # raw, unscaled
    assert rollout.episode_lengths == [3, 2]


def test_compute_gae_undiscounted_is_reward_to_go() -> None:
    """With gamma = lambda = 1 and no bootstrap, A_t = sum of future rewards - V_t."""
    rewards = np.array([[1.0], [2.0], [3.0]])
    values = np.array([[0.5], [0.25], [1.0]])
    dones = np.array([[0.0], [0.0], [1.0]])
    next_values = np.array([[0.25], [1.0], [0.0]])
    adv, ret = compute_gae(rewards, values, next_values, dones, 1.0, 1.0)
    assert np.allclose(adv[:, 0], [6.0 - 0.5, 5.0 - 0.25, 3.0 - 1.0])
    assert np.allclose(ret[:, 0], [6.0, 5.0, 3.0])


def test_mountaincar_observations_scaled_to_unit_box() -> None:
    """MountainCar observations are the affine map of [low, high] onto [-1, 1]."""
    worker = RolloutWorker.create("MountainCar-v0", 5, RunConfig(num_envs=2))
    layout = make_layout(2, 3, continuous=False)
    policy = ActorCritic(layout, continuous=False)
    theta = init_params(layout, np.random.default_rng(0))
    rollout = worker.collect(policy, theta, 256, np.random.default_rng(0))
    obs = rollout.batch["obs"]
    assert np.all(np.abs(obs) <= 1.0) and np.abs(obs[:, 1]).max() > 0.05
    space = gym.make("MountainCar-v0").observation_space
    for i, env in enumerate(worker.envs.unwrapped.envs):
        raw = np.asarray(env.unwrapped.state, np.float64)
        expected = 2.0 * (raw - space.low) / (space.high - space.low) - 1.0
        assert np.allclose(worker.obs[i], expected, rtol=0, atol=1e-6)
    assert rollout.episode_lengths == [200, 200]  # truncated episodes are counted


def test_cartpole_infinite_bounds_pass_through() -> None:
    """CartPole's unbounded velocity dims are left as they are."""
    envs = make_envs("CartPole-v1", 2, seed=0, reward_scale=0.1)
    raw = np.stack([np.asarray(e.unwrapped.state) for e in envs.unwrapped.envs])
    assert np.allclose(envs.last_obs[:, [1, 3]], raw[:, [1, 3]], rtol=0, atol=1e-7)
    assert np.allclose(envs.last_obs[:, 0], raw[:, 0] / 4.8, rtol=0, atol=1e-7)


@pytest.mark.parametrize("duplicate", ["pickle", "deepcopy"])
def test_worker_round_trip_continues_identically(duplicate: str) -> None:
    """A pickled (or copied) worker produces the same next batch as the original."""
    worker, policy, theta = _cartpole(seed=11)
    worker.collect(policy, theta, 37, np.random.default_rng(1))  # stop mid-episode
    if duplicate == "pickle":
        twin = pickle.loads(pickle.dumps(worker))
    else:
        twin = copy.deepcopy(worker)
    first = worker.collect(policy, theta, 128, np.random.default_rng(2))
    second = twin.collect(policy, theta, 128, np.random.default_rng(2))
    for key in first.batch:
        assert np.array_equal(first.batch[key], second.batch[key]), key
    assert first.episode_returns == second.episode_returns
    assert len(first.episode_returns) > 0
    # the continued episodes include steps taken before the copy was made
    fresh = _cartpole(seed=11)[0].collect(policy, theta, 128, np.random.default_rng(2))
    assert not np.array_equal(fresh.batch["obs"], first.batch["obs"])


def test_box2d_worker_pickle_replays_the_episode_in_a_fresh_process(tmp_path) -> None:
    """LunarLander (EzPickle: its pickle holds no state) pickles as a replay of the
    current episode; a fresh process continues exactly where the original is."""
    worker = RolloutWorker.create("LunarLander-v3", 0, RunConfig(num_envs=2))
    policy, theta = _policy_for(worker)
    worker.collect(policy, theta, 300, np.random.default_rng(1))
    replays = [env.replay_length for env in worker.envs.unwrapped.envs]
    assert all(0 < n <= 300 for n in replays), replays  # mid-episode, not from 0
    (tmp_path / "worker.pkl").write_bytes(pickle.dumps(worker))
    np.save(tmp_path / "theta.npy", theta)
    code = (
        "import pickle, sys, numpy as np\n"
        "from tests.participants.test_rollout import _policy_for\n"
        "d = sys.argv[1]\n"
        "w = pickle.loads(open(d + '/worker.pkl', 'rb').read())\n"
        "policy, _ = _policy_for(w)\n"
        "r = w.collect(policy, np.load(d + '/theta.npy'), 200, "
        "np.random.default_rng(2))\n"
        "np.save(d + '/obs.npy', r.batch['obs'])\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, check=True, timeout=120
    )
    here = worker.collect(policy, theta, 200, np.random.default_rng(2))
    assert np.array_equal(np.load(tmp_path / "obs.npy"), here.batch["obs"])
    # a fresh start would look different: the copy really continued
    fresh = RolloutWorker.create("LunarLander-v3", 0, RunConfig(num_envs=2))
    again = fresh.collect(policy, theta, 200, np.random.default_rng(2))
    assert not np.array_equal(again.batch["obs"], here.batch["obs"])


def test_unwrapped_box2d_env_still_refuses_to_pickle() -> None:
    """An EzPickle env that bypassed make_envs fails closed instead of restarting."""
    worker = RolloutWorker.create("LunarLander-v3", 0, RunConfig(num_envs=1))
    inner = worker.envs.unwrapped.envs[0]
    worker.envs.unwrapped.envs[0] = inner.env  # strip EpisodeReplay
    with pytest.raises(TypeError, match="LunarLander-v3: EzPickle env state"):
        pickle.dumps(worker)


def test_minibatches_partition_the_batch() -> None:
    """Minibatches are disjoint, equal-sized and cover the batch."""
    parts = minibatches(512, 2, np.random.default_rng(0))
    assert [len(p) for p in parts] == [256, 256]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(512))
    batch = {"x": np.arange(512) * 2}
    assert np.array_equal(take(batch, parts[0])["x"], parts[0] * 2)
    with pytest.raises(ValueError, match="not divisible into 3 minibatches"):
        minibatches(512, 3, np.random.default_rng(0))


def test_config_rejects_out_of_range_values() -> None:
    """The run config validates PPO's ranges and names the offending key."""
    for key in ("gamma", "gae-lambda"):
        with pytest.raises(
            ConfigError, match=f"{key}: must be in \\[0, 1\\], received 1.5"
        ):
            RunConfig.from_mapping({key: 1.5})
    assert RunConfig.from_mapping({"gamma": 1.0}).gamma == 1.0
    assert RunConfig().rounds_per_rollout == 4


def _small_learner(env_id: str, num_minibatches: int):
    """Participant 0's learner: 2 envs × 16 steps per rollout, one epoch."""
    from participants.learner import Learner
    from protocol.config import RunConfig

    cfg = RunConfig.from_mapping(
        {
            "env-id": env_id,
            "num-envs": 2,
            "num-steps": 16,
            "update-epochs": 1,
            "num-minibatches": num_minibatches,
            "backend": "plain",
        }
    )
    return Learner(cfg, 0)


def test_learner_continues_box2d_episodes_with_or_without_its_process():
    """The next round continues the same LunarLander episodes both in the process
    that ran the previous one (live worker) and in a fresh one (replayed)."""
    from participants import learner as learner_mod

    learner = _small_learner("LunarLander-v3", num_minibatches=1)
    theta = learner.initial_theta()
    _, stats1, saved = learner.step(theta, None, cache_scope="t")
    assert stats1["env_steps"] == 32
    key = ("t", "LunarLander-v3", 0, 0)
    live = learner_mod._WORKERS[key][1]
    obs_before = live.obs.copy()
    grad_live, stats2, _ = learner.step(theta, saved, cache_scope="t")
    assert stats2["env_steps"] == 32  # one minibatch per rollout: a new rollout
    assert learner_mod._WORKERS[key][1] is live  # the same worker went on
    assert not np.array_equal(live.obs, obs_before)
    del learner_mod._WORKERS[key]  # as in a fresh ClientApp process
    grad_fresh, _, _ = learner.step(theta, saved, cache_scope="t")
    assert learner_mod._WORKERS[key][1] is not live
    assert np.array_equal(grad_fresh, grad_live)
    assert np.array_equal(learner_mod._WORKERS[key][1].obs, live.obs)


def test_worker_pickle_reused_between_rollouts_and_renewed_after_one():
    """Rounds without a rollout reuse the worker's pickle (the worker did not
    change); after a rollout the saved worker is the new one: a fresh process
    resumed from it continues exactly like the live worker."""
    import pickle

    from participants import learner as learner_mod

    learner = _small_learner("CartPole-v1", num_minibatches=2)
    theta = learner.initial_theta()
    key = ("w", "CartPole-v1", 0, 0)
    _, s1, saved1 = learner.step(theta, None, cache_scope="w")  # rollout
    _, s2, saved2 = learner.step(theta, saved1, cache_scope="w")  # 2nd minibatch
    assert (s1["env_steps"], s2["env_steps"]) == (32, 0)
    w1, w2 = (pickle.loads(s)["worker"] for s in (saved1, saved2))
    assert w2 == w1
    live = learner_mod._WORKERS[key][1]
    grad_live, s3, saved3 = learner.step(theta, saved2, cache_scope="w")  # rollout
    assert s3["env_steps"] == 32
    w3 = pickle.loads(saved3)["worker"]
    assert w3 != w2
    assert np.array_equal(pickle.loads(w3).obs, live.obs)
    del learner_mod._WORKERS[key]  # a fresh process, resumed from round 2
    grad_fresh, _, _ = learner.step(theta, saved2, cache_scope="w")
    assert np.array_equal(grad_fresh, grad_live)
    assert np.array_equal(learner_mod._WORKERS[key][1].obs, live.obs)
