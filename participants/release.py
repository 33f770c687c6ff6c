"""Model release on a key holder's machine: ``hedrl-release`` and ``hedrl-eval``.

``hedrl-release`` decrypts nothing. It releases the final θ's twin this
participant computed, checked and stored at the end of the run
(:func:`participants.final.final`): the optimiser replayed in float64 over the
sealed updates the coordinator relayed (participants/twin.py), never a
decryption of a ciphertext the coordinator chose (docs/threat-model.md,
"Release"). Only once a majority of the federation has confirmed, with tags
only key holders can make, that they received the same final ciphertext, and
once per key. It never reads the coordinator's checkpoint. The policy is
flooded and rounded,

    θ_release = round(θ_twin + N(0, σ²), q),  σ = 2^-12 ≈ 2.4e-4,  q = 2^-14,

σ far below the scale of the weights (≈ 0.1–1).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np

from participants.guard import Guard
from participants.trust import Trust
from protocol import hedrl_version, keys
from protocol.errors import HedrlError, KeyMaterialError
from protocol.params import get_param_set

DEFAULT_NOISE_STD = 2.0**-12
DEFAULT_ROUND_TO = 2.0**-14


def _guards(keys_dir: Path, state_dir: Path) -> list[Guard]:
    """Every participant's guard under the key in ``keys_dir`` kept in
    ``state_dir``, lowest index first, each locked (a SuperNode serving the key
    waits until the release is done) and read under its lock."""
    key_path = keys_dir / keys.PARTICIPANT_FILE
    paths = sorted(state_dir.glob("guard-*.json"))
    records = [json.loads(path.read_text()) for path in paths]
    finals = [r["final"] for r in records if r.get("final")]
    if not finals:
        raise KeyMaterialError(
            f"no final θ in {state_dir}: the run has not finished (it ends with a "
            "final θ every participant checks)"
        )
    params = get_param_set(finals[0]["param_set"])
    _, fp = keys.participant_backend(key_path, params, finals[0]["backend"])
    indices = sorted({int(r["participant"]) for r in records if r["fingerprint"] == fp})
    if not indices:
        raise KeyMaterialError(f"no final θ under the key in {keys_dir}")
    guards: list[Guard] = []
    try:
        for index in indices:
            guards.append(Guard(Trust.local(key_path, state_dir, index), fp))
    except BaseException:
        for guard in guards:
            guard.close()
        raise
    return guards


def release(
    keys_dir: Path,
    out: Path,
    *,
    state_dir: Path | None = None,
    participant: int | None = None,
    noise_std: float = DEFAULT_NOISE_STD,
    round_to: float = DEFAULT_ROUND_TO,
) -> dict[str, Any]:
    """Flood and round the agreed final θ kept under the key in ``keys_dir``,
    write it to ``out``, and mark the key released for every participant whose
    state is kept in ``state_dir``."""
    if not noise_std > 0 or not round_to > 0:
        raise HedrlError("noise-std and round-to must be > 0 (a release needs both)")
    guards = _guards(keys_dir, state_dir or keys_dir)
    try:
        return _release(guards, out, participant, noise_std, round_to)
    finally:
        for guard in guards:
            guard.close()


def _release(
    guards: list[Guard],
    out: Path,
    participant: int | None,
    noise_std: float,
    round_to: float,
) -> dict[str, Any]:
    if any(g.state.released for g in guards):
        raise KeyMaterialError(
            "this key's final θ was released already; a second release with fresh "
            "noise would let the two be averaged (docs/threat-model.md)"
        )
    agreed = [
        g
        for g in guards
        if g.state.final
        and g.state.final.get("agreed")
        and participant in (None, g.trust.index)
    ]
    if not agreed:
        raise KeyMaterialError(
            "the final θ was not confirmed by a majority of the participants "
            "(they received different ciphertexts, or the run ended early): "
            "nothing is released"
        )
    if len({g.state.final["digest"] for g in agreed}) > 1:  # type: ignore[index]
        raise KeyMaterialError("participants here kept different final θ")
    theta, final = agreed[0].final_theta()
    rng = np.random.default_rng(secrets.randbits(128))  # never reproducible
    released = np.round((theta + rng.normal(0.0, noise_std, theta.shape)) / round_to)
    released *= round_to
    info = {
        "env_id": final["env_id"],
        "continuous": final["continuous"],
        "names": final["names"],
        "shapes": final["shapes"],
        "round": final["round"],
        "param_set": final["param_set"],
        "noise_std": noise_std,
        "round_to": round_to,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out, theta=released, info=np.frombuffer(json.dumps(info).encode(), np.uint8)
    )
    for g in guards:
        g.mark_released()
    return info


def load_policy(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(θ, info) of a released policy file; ValueError naming what the file is
    instead (the coordinator's checkpoint, or not a policy at all)."""
    try:
        with np.load(path) as data:
            files = set(data.files)
            if {"theta", "info"} <= files:
                return data["theta"].copy(), json.loads(bytes(data["info"]).decode())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(
            f"{path}: not a policy file of hedrl-release ({exc})"
        ) from None
    if "meta" in files and "theta/0" in files:
        raise ValueError(
            f"{path} is the coordinator's encrypted checkpoint, not a policy: "
            "run hedrl-release on a participant's host and evaluate its --out file"
        )
    raise ValueError(f"{path}: not a policy file of hedrl-release (no theta/info)")


def check_env_fits(info: dict[str, Any], env_id: str) -> None:
    """ValueError if ``env_id``'s observation or action size differs from the
    policy's (``info['env_id']`` is the env it was trained on)."""
    from participants.learner import env_spec

    shapes = dict(zip(info["names"], info["shapes"], strict=True))
    depth = sum(
        1 for n in info["names"] if n.startswith("actor.") and n.endswith(".weight")
    )
    want = (shapes["actor.0.weight"][1], shapes[f"actor.{depth - 1}.weight"][0])
    try:
        obs_dim, act_dim, continuous = env_spec(env_id)
    except Exception as exc:  # noqa: BLE001 (gymnasium raises many kinds)
        raise ValueError(f"--env-id {env_id!r}: {exc}") from None
    if (obs_dim, act_dim) != tuple(want) or continuous != bool(info["continuous"]):
        raise ValueError(
            f"the policy was trained on {info['env_id']} ({want[0]} observations, "
            f"{want[1]} actions); {env_id} has {obs_dim} and {act_dim}"
        )


def evaluate(
    path: Path,
    *,
    env_id: str | None,
    episodes: int,
    seed: int,
    gif: Path | None = None,
    fps: int = 30,
) -> list[float]:
    """Run ``episodes`` episodes of the released (stochastic) policy; raw returns.

    With ``gif``, the frames of the first episode are written as an animated GIF
    (needs Pillow).
    """
    from participants.envs import make_envs
    from participants.policy import ActorCritic, Layout

    theta, info = load_policy(path)
    if env_id and env_id != info["env_id"]:
        check_env_fits(info, env_id)
    layout = Layout(tuple(info["names"]), tuple(tuple(s) for s in info["shapes"]))
    policy = ActorCritic(layout, bool(info["continuous"]))
    frames: list[np.ndarray] = []
    if gif is not None:
        # frames are drawn off-screen: no display, and no SDL warning about one
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        try:
            from PIL import Image
        except ImportError as exc:
            raise ValueError("--gif needs Pillow: pip install 'hedrl[gif]'") from exc
    envs = make_envs(
        env_id or info["env_id"],
        1,
        seed,
        1.0,
        render_mode="rgb_array" if gif is not None else None,
    )
    rng = np.random.default_rng(seed)
    obs = envs.last_obs
    space = envs.single_action_space
    returns: list[float] = []
    while len(returns) < episodes:
        actions, _, _ = policy.act(theta, obs, rng)
        if info["continuous"]:
            actions = np.clip(actions, space.low, space.high)
        if gif is not None and not returns:
            frames.append(np.asarray(envs.render()[0]))
        obs, _, _, _, infos = envs.step(actions)
        if "_episode" in infos:
            returns += [float(r) for r in infos["episode"]["r"][infos["_episode"]]]
    envs.close()
    if gif is not None and frames:
        images = [Image.fromarray(f) for f in frames]
        gif.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(
            gif,
            save_all=True,
            append_images=images[1:],
            duration=int(1000 / fps),
            loop=0,
        )
    return returns[:episodes]


def release_main(argv: list[str] | None = None) -> int:
    """Entry point of ``hedrl-release``."""
    ap = argparse.ArgumentParser(
        prog="hedrl-release",
        description="Export the run's policy, once per key: the twin of the final "
        "θ this participant checked at the end of the run (the optimiser replayed "
        "in float64 over the participants' sealed updates, not a decryption), "
        "once a majority of the participants confirmed the same final ciphertext, "
        "with noise flooding and rounding (docs/threat-model.md, 'Release').",
    )
    ap.add_argument(
        "--version", action="version", version=f"%(prog)s {hedrl_version()}"
    )
    ap.add_argument(
        "--keys",
        required=True,
        type=Path,
        help="directory holding participant.ctx of the run",
    )
    ap.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the participant's state directory (node config state-dir; "
        "default: --keys)",
    )
    ap.add_argument(
        "--participant",
        type=int,
        default=None,
        help="participant index whose final θ to release (default: the lowest "
        "in the state directory)",
    )
    ap.add_argument("--out", required=True, type=Path, help="output POLICY.npz")
    ap.add_argument(
        "--noise-std",
        type=float,
        default=DEFAULT_NOISE_STD,
        help=f"Gaussian flooding noise σ (default 2^-12 = {DEFAULT_NOISE_STD:.3g})",
    )
    ap.add_argument(
        "--round-to",
        type=float,
        default=DEFAULT_ROUND_TO,
        help=f"rounding step (default 2^-14 = {DEFAULT_ROUND_TO:.3g})",
    )
    args = ap.parse_args(argv)
    try:
        info = release(
            args.keys,
            args.out,
            state_dir=args.state_dir,
            participant=args.participant,
            noise_std=args.noise_std,
            round_to=args.round_to,
        )
    except (HedrlError, OSError, KeyError, ValueError) as exc:
        print(f"hedrl-release: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"released {info['env_id']} policy (final θ of round {info['round']}) to "
        f"{args.out} with noise σ={info['noise_std']:.3g}, rounding "
        f"{info['round_to']:.3g}; this key releases nothing more."
    )
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """Entry point of ``hedrl-eval``."""
    ap = argparse.ArgumentParser(
        prog="hedrl-eval",
        description="Run evaluation episodes of a released policy (hedrl-release) "
        "and print the mean return.",
    )
    ap.add_argument(
        "--version", action="version", version=f"%(prog)s {hedrl_version()}"
    )
    ap.add_argument("policy", type=Path, help="POLICY.npz from hedrl-release")
    ap.add_argument(
        "--env-id",
        default=None,
        help="gymnasium id (default: the one the policy was trained on)",
    )
    ap.add_argument("--episodes", type=int, default=10, help="episodes (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="environment seed")
    ap.add_argument(
        "--gif",
        type=Path,
        default=None,
        help="record the first episode as an animated GIF (needs Pillow)",
    )
    args = ap.parse_args(argv)
    try:
        returns = evaluate(
            args.policy,
            env_id=args.env_id,
            episodes=args.episodes,
            seed=args.seed,
            gif=args.gif,
        )
    except (OSError, KeyError, ValueError) as exc:
        print(f"hedrl-eval: error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "episodes": len(returns),
                "mean_return": float(np.mean(returns)),
                "returns": returns,
            }
        )
    )
    return 0
