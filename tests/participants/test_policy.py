"""Tests for the numpy actor-critic: layout, init and analytic gradients."""

from __future__ import annotations

import numpy as np
import pytest

from participants.policy import ActorCritic, Layout, init_params, make_layout

# Central differences in float64 with step H: truncation error ~H**2 * f''' (~1e-12)
# and round-off ~eps * |loss| / H (~1e-9 for losses of order 1-10), so a coordinate
# passes if |fd - analytic| <= RTOL * max(|fd|, |analytic|) + ATOL.
H = 1e-6
RTOL = 1e-5
ATOL = 1e-8
N_COORDS = 200

HEADS = {
    "categorical": dict(obs_dim=4, act_dim=2, continuous=False),
    "gaussian": dict(obs_dim=3, act_dim=1, continuous=True),
}


def _setup(head: str, seed: int = 0, batch: int = 64):
    """Policy, perturbed parameters and a minibatch with a mix of clipped ratios."""
    spec = HEADS[head]
    layout = make_layout(spec["obs_dim"], spec["act_dim"], spec["continuous"])
    policy = ActorCritic(layout, spec["continuous"])
    rng = np.random.default_rng(seed)
    theta = init_params(layout, rng)
    theta += 0.05 * rng.standard_normal(layout.size)  # break init symmetries
    if spec["continuous"]:
        theta[layout.slices()[-1][1]] = -0.5 + 0.1 * rng.standard_normal(
            spec["act_dim"]
        )
    obs = rng.uniform(-1.0, 1.0, (batch, spec["obs_dim"]))
    actions, logprob, _ = policy.act(theta, obs, rng)
    # log-ratios of +-0.1 (inside the 0.2 clip range) and +-0.5 (outside), so both
    # surrogate branches are active and no ratio sits near a kink of the loss.
    shift = rng.choice([-0.5, -0.1, 0.1, 0.5], size=batch)
    mb = {
        "obs": obs,
        "actions": actions,
        "logprobs": logprob - shift,
        "advantages": rng.standard_normal(batch),
        "returns": rng.standard_normal(batch),
        "shift": shift,  # not a loss input; lets tests recover the on-policy logprob
    }
    return layout, policy, theta, mb, rng


def _loss_fn(policy: ActorCritic, mb: dict):
    return lambda t: policy.loss_and_grad(
        t, mb, clip_coef=0.2, vf_coef=0.5, ent_coef=0.01
    )


@pytest.mark.parametrize("head", sorted(HEADS))
def test_gradient_matches_finite_differences(head: str) -> None:
    """Analytic gradient equals central differences on sampled + all logstd coords."""
    layout, policy, theta, mb, rng = _setup(head)
    fn = _loss_fn(policy, mb)
    _, grad, stats = fn(theta)
    assert 0.25 < stats["clipfrac"] < 0.75  # both surrogate branches exercised
    coords = set(rng.choice(layout.size, size=N_COORDS, replace=False).tolist())
    for name, sl in layout.slices():
        if name == "actor.logstd" or name.endswith("2.bias"):
            coords.update(range(sl.start, sl.stop))
    for i in sorted(coords):
        step = np.zeros(layout.size)
        step[i] = H
        fd = (fn(theta + step)[0] - fn(theta - step)[0]) / (2 * H)
        tol = RTOL * max(abs(fd), abs(grad[i])) + ATOL
        assert abs(fd - grad[i]) <= tol, f"coord {i}: fd {fd!r} vs analytic {grad[i]!r}"


@pytest.mark.parametrize("head", sorted(HEADS))
def test_clipped_samples_carry_no_policy_gradient(head: str) -> None:
    """With every ratio clipped on the flat side, only the critic gets a gradient."""
    layout, policy, theta, mb, _ = _setup(head)
    logprob = mb["logprobs"] + mb.pop("shift")
    adv = np.where(np.arange(len(logprob)) % 2 == 0, 1.0, -1.0)  # mean 0: signs kept
    # ratio e^0.5 where A > 0 and e^-0.5 where A < 0: the clipped term is the max
    old = logprob - np.where(adv > 0, 0.5, -0.5)
    _, grad, stats = policy.loss_and_grad(
        theta, {**mb, "advantages": adv, "logprobs": old}, 0.2, 0.5, 0.0
    )
    assert stats["clipfrac"] == 1.0
    actor = [sl for name, sl in layout.slices() if name.startswith("actor.")]
    critic = [sl for name, sl in layout.slices() if name.startswith("critic.")]
    assert all(np.all(grad[sl] == 0.0) for sl in actor)
    assert any(np.any(grad[sl] != 0.0) for sl in critic)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_on_policy_minibatch_has_unit_ratio(head: str) -> None:
    """Log-probs from ``act`` match the loss path: ratio 1, zero KL and clipfrac."""
    _, policy, theta, mb, rng = _setup(head)
    actions, logprob, value = policy.act(theta, mb["obs"], rng)
    assert np.allclose(value, policy.value(theta, mb["obs"]), rtol=0, atol=1e-15)
    on_policy = {**mb, "actions": actions, "logprobs": logprob}
    _, _, stats = policy.loss_and_grad(theta, on_policy, 0.2, 0.5, 0.0)
    assert abs(stats["approx_kl"]) < 1e-14
    assert stats["clipfrac"] == 0.0


def test_layout_cartpole_offsets_and_size() -> None:
    """CartPole layout: 9155 params, contiguous offsets, names in actor/critic order."""
    layout = make_layout(4, 2, continuous=False)
    actor = (4 * 64 + 64) + (64 * 64 + 64) + (64 * 2 + 2)
    critic = (4 * 64 + 64) + (64 * 64 + 64) + (64 * 1 + 1)
    assert layout.size == actor + critic == 9155
    assert layout.names[0] == "actor.0.weight"
    assert layout.names[-1] == "critic.2.bias"
    assert layout.shapes[0] == (64, 4)
    assert layout.offsets[layout.names.index("critic.0.weight")] == actor
    ends = [sl.stop for _, sl in layout.slices()]
    assert list(layout.offsets[1:]) == ends[:-1] and ends[-1] == layout.size


def test_layout_gaussian_has_logstd_last() -> None:
    """Gaussian layout ends with ``actor.logstd`` of shape (act_dim,)."""
    layout = make_layout(3, 1, continuous=True)
    assert layout.names[-1] == "actor.logstd"
    assert layout.shapes[-1] == (1,)
    assert layout.size == make_layout(3, 1, continuous=False).size + 1
    assert isinstance(layout, Layout)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_init_is_orthogonal_with_cleanrl_gains(head: str) -> None:
    """Weights are gain * (semi-)orthogonal; biases and logstd start at zero."""
    spec = HEADS[head]
    layout = make_layout(spec["obs_dim"], spec["act_dim"], spec["continuous"])
    theta = init_params(layout, np.random.default_rng(3))
    views = layout.views(theta)
    gains = {"0": np.sqrt(2.0), "1": np.sqrt(2.0)}
    for name, w in views.items():
        if not name.endswith(".weight"):
            assert np.all(w == 0.0), name
            continue
        net, index = name.split(".")[:2]
        gain = gains.get(index, 0.01 if net == "actor" else 1.0)
        small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        assert np.allclose(small, gain**2 * np.eye(small.shape[0]), atol=1e-12), name


def test_head_mismatch_is_rejected() -> None:
    """A categorical policy refuses a layout that carries ``actor.logstd``."""
    with pytest.raises(ValueError, match="continuous=False does not match layout"):
        ActorCritic(make_layout(3, 1, continuous=True), continuous=False)
