"""What a participant trusts: its own operator's settings.

The coordinator, and whoever runs the SuperLink, is an active adversary
(docs/threat-model.md): task fields and the run config a deployed participant
receives come from its side. A participant takes every security setting from
its own operator instead: the node config (``flower-supernode --node-config
FILE.toml``, written by ``deploy/provision.sh``) in a deployment, the run
config only in a simulation, where one user plays every role.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocol.adam import max_step
from protocol.config import RunConfig, expand_dir
from protocol.errors import ConfigError

AUTO_BOUND_MARGIN = 1.25
"""theta-step-bound 0 means this many times the largest step the run config's
server optimiser allows (:func:`protocol.adam.max_step`: ≈ 12.8·lr for Adam at
β1 0.9, β2 0.999, measured on the presets: at most 7.7·lr)."""


def largest_step(cfg: RunConfig) -> float:
    """The largest change per θ element an honest step of ``cfg`` can make
    (:func:`protocol.adam.max_step`; every G of the run config counts)."""
    bounds = [cfg.clip_bound, *(g for _, g in cfg.layer_bound_rules)]
    return max_step(cfg.optimizer, cfg.hyper, max(bounds))


def auto_bound(cfg: RunConfig) -> float:
    """Simulation's theta-step-bound 0: :data:`AUTO_BOUND_MARGIN` × the
    largest step of the run's optimiser."""
    return AUTO_BOUND_MARGIN * largest_step(cfg)


KEY_FILE = "participant.ctx"
#: a simulation's resource caps: none (the user is every party)
UNCAPPED = 2**62
#: what Flower's simulation puts in a node config (nothing else: a deployment's)
SIMULATION_NODE_KEYS = frozenset({"partition-id", "num-partitions"})

# Node-config keys of a deployed participant and their defaults (deployment).
NODE_DEFAULTS: dict[str, Any] = {
    # ≥ 1.25 × step_sup × lr for lr up to 0.0040 at the default Adam constants
    "theta-step-bound": 0.065,
    "max-round-gap": 64,
    "max-rounds": 100_000,
    "refusal-budget": 3,
    "report-metrics": False,
    # the policy size a run config may ask for (hidden-sizes, env-id): each
    # parameter costs ciphertext traffic and ~1 kB of kept twin snapshots
    "max-param-count": 200_000,
    # environment steps per rollout (num-envs × num-steps) a run config may ask for
    "max-rollout-steps": 65_536,
}


@dataclass(frozen=True)
class Trust:
    """A participant's own security settings and where its key and state are."""

    key_path: Path
    """The secret context."""
    state_dir: Path
    """Where the guard state is kept (writable)."""
    index: int
    """This participant's index in the federation."""
    theta_step_bound: float
    """Largest accepted change of an element of θ per round."""
    max_round_gap: int
    """Rounds the θ bound grows over at most (G)."""
    max_rounds: int
    """Highest round number served under one key."""
    refusal_budget: int
    """Refusals under one key before the participant stops (B)."""
    report_metrics: bool
    """Report episode counts, returns and stage timings."""
    federation_size: int
    """Participants provisioned with this key (the final θ's quorum is a
    majority of them)."""
    deployed: bool
    """Settings from the node config (deployment), not the run config."""
    may_provision: bool = False
    """Create the key if it is missing (simulation, for the run's own key)."""
    seed_salt: tuple[int, ...] = ()
    """Mixed into the rollout seeds (deployment: :func:`rollout_salt`)."""
    max_param_count: int = NODE_DEFAULTS["max-param-count"]
    """Largest policy (parameters) a run config may make this participant train
    (simulation: no cap, one user plays every part)."""
    max_rollout_steps: int = NODE_DEFAULTS["max-rollout-steps"]
    """Most environment steps per rollout a run config may ask for."""
    min_updates: int = 1
    """Fewest updates a step may sum (a step of one update would put that
    participant's gradient into the released policy)."""

    @classmethod
    def from_context(
        cls, node_config: Mapping[str, Any], cfg: RunConfig, run_id: int
    ) -> Trust:
        """Settings from the node config in deployment, the run config in
        simulation. A node config holding anything but what Flower's simulation
        puts there (partition-id, num-partitions) is a deployment's, and then
        every setting comes from it: one without a secret-context fails closed."""
        if set(node_config) - SIMULATION_NODE_KEYS:
            return cls._deployed(node_config, cfg)
        key_run = cfg.key_run_id or _checkpoint_key_run(cfg) or run_id
        own = key_run == run_id
        key_dir = expand_dir(cfg.keys_dir) / f"run-{key_run}"
        return cls(
            key_path=key_dir / KEY_FILE,
            state_dir=key_dir,
            index=int(node_config.get("partition-id", 0)),
            theta_step_bound=cfg.theta_step_bound or auto_bound(cfg),
            max_round_gap=cfg.max_round_gap,
            max_rounds=cfg.max_rounds,
            refusal_budget=cfg.refusal_budget,
            report_metrics=cfg.report_metrics,
            federation_size=cfg.num_participants,
            min_updates=cfg.min_participants_for(cfg.num_participants),
            max_param_count=UNCAPPED,
            max_rollout_steps=UNCAPPED,
            deployed=False,
            may_provision=own,
        )

    @classmethod
    def _deployed(cls, nc: Mapping[str, Any], cfg: RunConfig) -> Trust:
        def get(key: str, kind: type) -> Any:
            value = nc.get(key, NODE_DEFAULTS.get(key))
            if value is None:
                raise ConfigError(f"node config: {key!r} is required in deployment")
            if kind is bool and isinstance(value, str):
                value = {"true": True, "false": False}.get(value.lower(), value)
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(f"node config {key!r}: expected true or false")
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"node config {key!r}: expected {kind.__name__}, received {value!r}"
                ) from None

        if not nc.get("secret-context"):
            raise ConfigError(
                "node config: 'secret-context' is required in deployment (the path "
                "of participant.ctx; deploy/provision.sh writes it in node.toml)"
            )
        key_path = Path(str(nc["secret-context"])).expanduser()
        state = nc.get("state-dir") or key_path.parent
        trust = cls(
            key_path=key_path,
            state_dir=Path(str(state)).expanduser(),
            index=get("participant-index", int)
            if "participant-index" in nc or "partition-id" not in nc
            else int(nc["partition-id"]),
            theta_step_bound=get("theta-step-bound", float),
            max_round_gap=get("max-round-gap", int),
            max_rounds=get("max-rounds", int),
            refusal_budget=get("refusal-budget", int),
            report_metrics=get("report-metrics", bool),
            federation_size=get("federation-size", int),
            max_param_count=get("max-param-count", int),
            max_rollout_steps=get("max-rollout-steps", int),
            deployed=True,
            seed_salt=rollout_salt(key_path),
            min_updates=get("min-updates", int)
            if "min-updates" in nc
            else -(-get("federation-size", int) // 2),
        )
        trust.validate()
        return trust

    @classmethod
    def local(cls, key_path: Path, state_dir: Path, index: int) -> Trust:
        """Settings for reading a guard's state on the key holder's machine
        (hedrl-release): the deployment defaults, no messages handled."""
        return cls(
            key_path=key_path,
            state_dir=state_dir,
            index=index,
            theta_step_bound=NODE_DEFAULTS["theta-step-bound"],
            max_round_gap=NODE_DEFAULTS["max-round-gap"],
            max_rounds=NODE_DEFAULTS["max-rounds"],
            refusal_budget=NODE_DEFAULTS["refusal-budget"],
            report_metrics=False,
            federation_size=1,
            deployed=True,
        )

    def admit_layout(self, size: int) -> None:
        """Refuse, before anything is decrypted and with nothing charged, a
        policy of more than max-param-count parameters (the run config's
        hidden-sizes and env-id set its size)."""
        if size > self.max_param_count:
            raise ConfigError(
                f"the run config's policy has {size} parameters, above this "
                f"participant's max-param-count {self.max_param_count} (node config): "
                "use smaller hidden-sizes, or raise max-param-count"
            )

    def admit_run(self, cfg: RunConfig) -> None:
        """Refuse a run config whose honest steps this participant's bound
        could not take, before anything is decrypted and with nothing charged
        (a function of the run config and the node config alone): otherwise
        whether a relayed step crossed the bound would depend on the sealed
        updates' values, and a coordinator that dials lr_t could read their
        magnitudes from charged refusals (docs/threat-model.md)."""
        steps = cfg.num_envs * cfg.num_steps
        if steps > self.max_rollout_steps:
            raise ConfigError(
                f"run config asks for rollouts of {steps} environment steps "
                f"(num-envs × num-steps), above this participant's max-rollout-steps "
                f"{self.max_rollout_steps} (node config)"
            )
        k, f = cfg.num_participants, self.federation_size
        if k < f:
            raise ConfigError(
                f"run config num-participants {k} is below this participant's "
                f"federation-size {f}: its updates would be weighted by 1/{k}"
            )
        need = largest_step(cfg)
        if need > self.theta_step_bound:
            raise ConfigError(
                f"run config steps θ by up to {need:.4g} per round (optimizer "
                f"{cfg.optimizer!r}, lr {cfg.lr:g}); this participant's "
                f"theta-step-bound is {self.theta_step_bound:g}: raise it in its "
                "node config (deploy/provision.sh --preset) or run a smaller lr"
            )

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible setting."""
        if not 0.0 < self.theta_step_bound < float("inf"):
            raise ConfigError(
                f"theta-step-bound must be > 0, received {self.theta_step_bound}"
            )
        for key, value in (
            ("max-round-gap", self.max_round_gap),
            ("max-rounds", self.max_rounds),
            ("refusal-budget", self.refusal_budget),
            ("federation-size", self.federation_size),
            ("min-updates", self.min_updates),
            ("max-param-count", self.max_param_count),
            ("max-rollout-steps", self.max_rollout_steps),
        ):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, received {value}")
        if self.index < 0:
            raise ConfigError(f"participant-index must be >= 0, received {self.index}")


def rollout_salt(key_path: Path) -> tuple[int, ...]:
    """Four words only key holders can compute, for a deployed participant's
    rollout seeds: the coordinator picks the run's seed, and with it alone it
    could replay every rollout and read a participant's gradient back out of a
    released policy (docs/threat-model.md, "Release"). HMAC of the key file's
    closing SHA-256, which covers the secret key; () if there is no key file
    (the participant then fails closed when it loads the key)."""
    try:
        with open(key_path, "rb") as fh:
            fh.seek(-32, os.SEEK_END)
            tail = fh.read(32)
    except OSError:
        return ()
    mac = hmac.new(tail, b"hedrl-rollout-seed", hashlib.sha256).digest()
    return tuple(int.from_bytes(mac[i : i + 4], "little") for i in range(0, 16, 4))


def _checkpoint_key_run(cfg: RunConfig) -> int:
    """The key run id written in resume-from's checkpoint (simulation only)."""
    if not cfg.resume_from:
        return 0
    path = Path(cfg.resume_from).expanduser()
    try:
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode())
        return int(meta.get("key_run_id", meta["run_id"]))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"resume-from: unreadable checkpoint ({exc})") from exc
