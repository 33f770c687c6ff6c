"""What the fidelity benchmark's runner, quick check and report share: presets,
variants, result paths, the θ trace, and how a run's rows are scored."""

from __future__ import annotations

import dataclasses
import json
import logging
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol import keys
from protocol.backend import Ct
from protocol.config import RunConfig

if TYPE_CHECKING:
    from coordinator.federation import Federation

ROOT = Path(__file__).resolve().parent
PRESETS = ROOT / "presets"
#: per preset: solve-threshold, random-return, max-rounds (the presets hold
#: run-config keys only)
TARGETS = ROOT / "targets.toml"
RESULTS = ROOT / "results"
VARIANTS = {
    "ckks": {"backend": "ckks", "optimizer": "he-adam"},
    "plain": {"backend": "plain", "optimizer": "he-adam"},
    "exact": {"backend": "plain", "optimizer": "exact-adam"},
}
TRACE_ROUNDS = 20
#: run-config keys of a preset that change what a run shows, not what it learns
DISPLAY_KEYS = frozenset({"solve-threshold", "tensorboard"})
# a stopped run loses at most this many rounds (a checkpoint of the 9k-parameter
# policies is a few hundred kB; writing it costs a few ms)
CHECKPOINT_EVERY = 250
log = logging.getLogger("hedrl.fidelity")


def load_preset(
    name: str, extra: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run-config overrides, benchmark settings) of a preset, with ``extra``
    (``--set``) run-config values on top."""
    data = tomllib.loads((PRESETS / f"{name}.toml").read_text())
    targets = tomllib.loads(TARGETS.read_text())
    if name not in targets:
        raise KeyError(f"preset {name!r} has no [{name}] table in {TARGETS}")
    return {**data, **(extra or {})}, targets[name]


def sweep_settings(
    env: str, seed: int, variant: str, work: Path, rounds: int, participants: int
) -> dict[str, Any]:
    """The run-config values the benchmark sets itself, over the preset's."""
    return {
        **VARIANTS[variant],
        "seed": seed,
        "num-rounds": rounds,
        "num-participants": participants,
        "stop-return": 0.0,
        "results-dir": str(work / "results"),
        "keys-dir": str(work / "keys"),
        "run-name": f"{env}-{variant}-{seed}",
        "checkpoint-every": CHECKPOINT_EVERY,
        "node-wait": 5.0,
        # sweeps run one process per core; the aggregate is traced in-process
        "coordinator-workers": 0,
    }


# keys --set may not override (flags: --seeds, --variants, --max-rounds)
SWEEP_KEYS = frozenset(sweep_settings("env", 0, "plain", Path(), 1, 1))


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs: TOML values (bare words are strings); keys
    must be run-config keys, so that a typo cannot pass as the preset."""
    known = {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(
                f"--set {item!r}: expected run-config-key=value with a key of "
                "[tool.flwr.app.config] (docs/configuration.md)"
            )
        if key in SWEEP_KEYS:
            raise ValueError(
                f"--set {key}: set by the benchmark itself (seeds, variants and "
                "the round budget have their own flags)"
            )
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out[key] = value
    return out


def final_return(rows: list[dict[str, Any]], episodes: int = 100) -> float | None:
    """Mean return over the last ``episodes`` episodes (whole rounds, from the end)."""
    total, count = 0.0, 0
    for r in reversed(rows):
        if r["episodes"]:
            total += r["return_mean"] * r["episodes"]
            count += r["episodes"]
            if count >= episodes:
                break
    return total / count if count else None


def rounds_to_solve(
    rows: list[dict[str, Any]], threshold: float
) -> tuple[int, int] | None:
    """First (round, env steps) at which the last-100-episode mean reaches threshold."""
    steps = 0
    for i, r in enumerate(rows):
        steps += r["env_steps"]
        if r["episodes"]:
            fr = final_return(rows[: i + 1])
            window = sum(x["episodes"] for x in rows[: i + 1])
            if window >= 100 and fr is not None and fr >= threshold:
                return r["round"], steps
    return None


class ThetaTrace:
    """Participant-side decryption of θ and of the aggregate for the first rounds."""

    def __init__(self, key_path: Path, backend: str, rounds: int) -> None:
        self.key_path, self.backend, self.rounds = key_path, backend, rounds
        self.theta: list[np.ndarray] = []
        self.aggregate: list[np.ndarray] = []

    def __call__(self, t: int, fed: Federation) -> None:
        if t > self.rounds:
            return
        part, _ = keys.participant_backend(self.key_path, fed.params, self.backend)

        def dec(cts: list[Any], level: int) -> np.ndarray:
            values = [part.decrypt(fed.be.to_bytes(c), level=level) for c in cts]
            return np.concatenate(values)[: fed.param_count]

        self.theta.append(dec(fed.theta, 0))
        if fed.last_aggregate is not None:
            # the sum carries the participants' pre-factor; decrypt and divide it out
            agg = [Ct(c.data, c.level) for c in fed.last_aggregate]
            self.aggregate.append(dec(agg, fed.be.top_level) / fed.be.gradient_factor)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"theta": np.array(self.theta), "aggregate": np.array(self.aggregate)}

    def load(self, path: Path) -> None:
        """The trace of a stopped run's first rounds (it resumes later)."""
        with np.load(path) as data:
            self.theta = list(data["theta"])
            self.aggregate = list(data["aggregate"])


def result_path(out: Path, env: str, variant: str, seed: int) -> Path:
    return out / "fidelity" / env / f"{variant}-seed{seed}.json"


def work_path(out: Path, env: str, variant: str, seed: int) -> Path:
    """Keys and checkpoints of a run in progress (removed when it finishes)."""
    return out / "fidelity" / ".work" / env / f"{variant}-seed{seed}"


def trace_path(out: Path, env: str, variant: str, seed: int) -> Path:
    """θ and aggregate of the first rounds (large; kept out of git)."""
    return out / "fidelity" / ".traces" / env / f"{variant}-seed{seed}.npz"


def stale(path: Path, env: str, extra: dict[str, Any] | None = None) -> str | None:
    """Why a finished result no longer matches its env's preset (None: current)."""
    current, _ = load_preset(env, extra)
    used = json.loads(path.read_text()).get("preset")
    if used is None:
        return "no preset recorded"
    used, current = (
        {k: v for k, v in d.items() if k not in DISPLAY_KEYS} for d in (used, current)
    )
    if used != current:
        keys = sorted(
            k for k in set(used) | set(current) if used.get(k) != current.get(k)
        )
        return "preset changed since: " + ", ".join(
            f"{k} {used.get(k)!r} -> {current.get(k)!r}" for k in keys
        )
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None
