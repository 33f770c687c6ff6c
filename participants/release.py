"""Model release on a key holder's machine: ``hedrl-release`` and ``hedrl-eval``.

IND-CPA^D (Li & Micciancio, "On the security of homomorphic encryption on
approximate numbers", EUROCRYPT 2021): a CKKS decryption carries the encryption
error e; anyone who sees decryptions in full precision together with the
ciphertexts can solve for the secret key (two full-precision decryptions of θ
recovered the key in ~0.1 s in our probe, ARCHITECTURE §2). A released policy
therefore goes out only after **noise flooding and rounding**:

    θ_release = round(θ_dec + N(0, σ²), q),  σ = 2^-12 ≈ 2.4e-4,  q = 2^-14

At ``8k-35x3`` the decryption error of θ is ≈ 1e-7…1e-6 (measured), so σ is
≈ 2^8–2^11 times larger: the error's contribution to each released value is
hidden up to a statistical distance of roughly |e|/σ per coordinate. This is a
mitigation, not a proof — a 2^-40 bound would need σ ≈ 2^40·|e|, which would
destroy the policy. Hence: **retire the key after a release** (a fresh key per
training run is the default) and never release twice from the same key.
σ is far below the scale of the weights (≈ 0.1–1).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np

from protocol import keys
from protocol.checkpoint import read_checkpoint
from protocol.errors import FingerprintMismatch, HeaderMismatch, HedrlError
from protocol.params import get_param_set

DEFAULT_NOISE_STD = 2.0**-12
DEFAULT_ROUND_TO = 2.0**-14


def release(
    keys_dir: Path,
    checkpoint: Path,
    out: Path,
    *,
    noise_std: float = DEFAULT_NOISE_STD,
    round_to: float = DEFAULT_ROUND_TO,
) -> dict[str, Any]:
    """Decrypt the checkpoint's θ, flood with noise, round, and write ``out``."""
    from participants.layout import make_layout
    from participants.learner import env_spec
    from protocol.packing import layout_digest, unpack

    if not noise_std > 0 or not round_to > 0:
        raise HedrlError("noise-std and round-to must be > 0 (a release needs both)")
    meta, vectors = read_checkpoint(checkpoint)
    params = get_param_set(meta["param_set"])
    be, fp = keys.participant_backend(
        keys_dir / keys.PARTICIPANT_FILE, params, meta["backend"]
    )
    if fp != meta["fingerprint"]:
        raise FingerprintMismatch(
            expected=meta["fingerprint"],
            received=fp,
            where=f"key in {keys_dir} vs checkpoint",
        )
    obs_dim, act_dim, continuous = env_spec(meta["env_id"])
    layout = make_layout(obs_dim, act_dim, continuous)
    digest = layout_digest(zip(layout.names, layout.shapes, strict=True))
    if digest != meta["layout_digest"]:
        raise HeaderMismatch(
            field="layout_digest", expected=meta["layout_digest"], received=digest
        )
    # θ is kept at the bottom level (it only ever receives additions)
    chunks = [be.decrypt(c, level=0) for c in vectors["theta"]]
    theta = unpack(chunks, int(meta["param_count"]))
    rng = np.random.default_rng(secrets.randbits(128))  # never reproducible
    released = np.round((theta + rng.normal(0.0, noise_std, theta.shape)) / round_to)
    released *= round_to
    info = {
        "env_id": meta["env_id"],
        "continuous": continuous,
        "names": list(layout.names),
        "shapes": [list(s) for s in layout.shapes],
        "step": meta["step"],
        "param_set": meta["param_set"],
        "noise_std": noise_std,
        "round_to": round_to,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out, theta=released, info=np.frombuffer(json.dumps(info).encode(), np.uint8)
    )
    return info


def load_policy(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(θ, info) of a released policy file."""
    with np.load(path) as data:
        return data["theta"].copy(), json.loads(bytes(data["info"]).decode())


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
    layout = Layout(tuple(info["names"]), tuple(tuple(s) for s in info["shapes"]))
    policy = ActorCritic(layout, bool(info["continuous"]))
    frames: list[np.ndarray] = []
    if gif is not None:
        try:
            from PIL import Image
        except ImportError as exc:
            raise ValueError("--gif needs Pillow: pip install pillow") from exc
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
        description="Decrypt the final θ of an encrypted checkpoint on a key holder's "
        "machine and export it with noise flooding and rounding (IND-CPA^D; see "
        "participants/release.py). Retire the key afterwards.",
    )
    ap.add_argument(
        "--keys",
        required=True,
        type=Path,
        help="directory holding participant.ctx of the run",
    )
    ap.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.npz")
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
            args.checkpoint,
            args.out,
            noise_std=args.noise_std,
            round_to=args.round_to,
        )
    except (HedrlError, OSError, KeyError, ValueError) as exc:
        print(f"hedrl-release: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"released {info['env_id']} policy (step {info['step']}) to {args.out} with "
        f"noise σ={info['noise_std']:.3g}, rounding {info['round_to']:.3g}; "
        "retire this key now"
    )
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """Entry point of ``hedrl-eval``."""
    ap = argparse.ArgumentParser(
        prog="hedrl-eval",
        description="Run evaluation episodes of a released policy (hedrl-release) "
        "and print the mean return.",
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
