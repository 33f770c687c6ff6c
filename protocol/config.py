"""The run configuration both apps read, built once from ``context.run_config``.

Keys are the kebab-case names of ``[tool.flwr.app.config]`` in pyproject.toml;
every value is range-checked here so that a bad value fails at start, not
mid-run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.adam import OPTIMIZERS, AdamHyper
from protocol.backend import BACKENDS
from protocol.errors import ConfigError
from protocol.params import HE_ADAM_DEPTH, get_param_set

#: the most minibatch updates a round (delta) or a rollout (gradient) may take
MAX_MINIBATCHES = 1024
#: run-config values that mean "the update mode's default" ...
UNSET: dict[str, float] = {
    "lr": 0.0,
    "beta1": -1.0,
    "adam_floor": 0.0,
    "update_epochs": 0,
    "num_minibatches": 0,
}
#: ... and those defaults (docs/configuration.md#update-modes; measured in
#: benchmarks/results/rounds.md)
MODE_DEFAULTS: dict[str, dict[str, float]] = {
    "gradient": {"lr": 2e-3, "beta1": 0.9, "update_epochs": 2, "num_minibatches": 2},
    "delta": {
        "lr": 0.2,
        "beta1": 0.2,
        "adam_floor": 1.0,
        "update_epochs": 4,
        "num_minibatches": 4,
    },
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; one field per run-config key."""

    backend: str = "ckks"
    """ckks, or plain for the plaintext twin."""
    param_set: str = "8k-35x3"
    """CKKS parameter set id."""
    env_id: str = "CartPole-v1"
    """Gymnasium environment id."""
    num_participants: int = 4
    """Participants per round (the ServerApp waits for this many nodes)."""
    min_participants: int = 0
    """Fewest usable replies for a step (0: half of num-participants, rounded up)."""
    spare_refresher: bool = True
    """If the refresher fails, ask another participant to refresh (one extra trip)."""
    num_rounds: int = 400
    """Rounds (= HE-Adam steps) to run at most."""
    stop_return: float = 0.0
    """Stop when the last-20 non-null return_mean mean reaches this (0: never)."""
    solve_threshold: float = 0.0
    """The return counted as solved (curve, summary; 0: gymnasium's for the env)."""
    seed: int = 0
    """Root seed: θ0 and every participant's environments derive from it."""
    participant_update: str = "gradient"
    """gradient: one PPO minibatch gradient per round (PPO-FedSGD); delta: a
    rollout and E×M local PPO minibatch updates per round, participants send
    Δ = θ − θ_local and the server optimiser steps on their mean."""
    local_optimizer: str = "sgd"
    """delta mode: sgd or adam, on the participant's local copy."""
    local_lr: float = 0.2
    """delta mode: the local optimiser's learning rate."""
    local_grad_norm: float = 0.0
    """delta mode: scale each local gradient to this global norm at most (0: off)."""
    optimizer: str = "he-adam"
    """Server optimiser: he-adam (the circuit), exact-adam (exact √; backend
    plain only), or the baselines on the plain mean of the updates: fedavg
    (θ − lr·mean; FedAvg at lr 1) and fedavgm (server momentum β1)."""
    lr: float = 0.0
    """HE-Adam learning rate (0: the update mode's default)."""
    anneal_lr: bool = False
    """Decay the learning rate linearly over num-rounds (a public scalar)."""
    beta1: float = -1.0
    """HE-Adam β1 (-1: the update mode's default)."""
    beta2: float = 0.999
    """HE-Adam β2."""
    adam_floor: float = 0.0
    """δ inside Adam's root, in units of the normalised update clip(u, ±G)/G
    squared (0: the update mode's default; gradient mode's is c² = (1−β2)/β2).
    A floor above the updates' squares makes small updates step like server
    momentum, lr/√δ per unit, while large ones stay normalised."""
    rsqrt_a: float = 3.0
    """HE-Adam's A in r' = r·(A − P)/((A − 1)·√β2), in [3, 6]: 3 = one Newton step
    (29 % low right after a spike); 4.16 bounds the error by 3.4 % (same cost)."""
    clip_bound: float = 0.1
    """Per-layer element-wise gradient clip G; participants send clip(g, ±G)/G."""
    layer_bounds: str = ""
    """Per-layer G overriding clip-bound: 'prefix=G,...' on dotted layer names
    (e.g. 'actor.0=0.1,critic=0.01'); the longest matching prefix wins."""
    hidden_sizes: str = "64,64"
    """Hidden layer widths of the actor and of the critic, e.g. '64,64' (1–3
    tanh layers of 1–512 units)."""
    num_envs: int = 4
    """Vector envs per participant."""
    num_steps: int = 128
    """Steps per env per rollout."""
    update_epochs: int = 0
    """PPO epochs per rollout (E; 0: the update mode's default)."""
    num_minibatches: int = 0
    """PPO minibatches per epoch (M; 0: the update mode's default); gradient
    mode: one round per minibatch."""
    gamma: float = 0.99
    """Discount."""
    gae_lambda: float = 0.95
    """GAE λ."""
    clip_coef: float = 0.2
    """PPO ratio clip."""
    vf_coef: float = 0.5
    """Value-loss coefficient."""
    ent_coef: float = 0.0
    """Entropy bonus."""
    reward_scale: float = 0.1
    """Fixed reward scale for learning (returns are logged unscaled)."""
    results_dir: str = "~/.hedrl/results"
    """Where <run-name>/metrics.jsonl goes; relative paths are under ~/.hedrl."""
    tensorboard: bool = False
    """Also write TensorBoard event files into the run's folder (extra: tensorboard)."""
    run_name: str = ""
    """Name of the results folder (default: <env id>-<UTC date>-<time>); an
    existing run's folder is refused unless resuming."""
    keys_dir: str = "~/.hedrl/keys"
    """Participants provision run-<run id>/ here unless node-config names a context."""
    expect_fingerprint: str = ""
    """Fingerprint printed by hedrl-keygen; the coordinator refuses any other key."""
    resume_from: str = ""
    """Path of a checkpoint.npz to continue from (same key, same total rounds)."""
    checkpoint_every: int = 50
    """Write the encrypted checkpoint every N rounds (and at the end)."""
    mask_bits: int = 20
    """Refresh masks are uniform in ±2^mask_bits (at most 22, and at most the
    parameter set's ``max_mask_bits``: 23 at 8k-35x3, 8 at 16k-50x6)."""
    coordinator_workers: int = -1
    """Worker processes sharding the coordinator's per-chunk work (parsing, sum,
    unmask, HE-Adam): -1 = one per core, up to the chunk count and 8 (none on a
    single core or for a single chunk); 0 = in the ServerApp's process."""
    retain_freed_memory: bool = True
    """Keep freed large allocations for reuse instead of faulting fresh pages in
    every round, in coordinator and participants (:mod:`protocol.memory`)."""
    round_timeout: float = 600.0
    """Seconds to wait for replies in one exchange."""
    node_wait: float = 120.0
    """Seconds to wait for num-participants nodes to register."""
    key_run_id: int = 0
    """Simulation only: participants use the key of keys-dir/run-<key-run-id>/
    (0: the checkpoint's key when resume-from is set, else this run's own)."""
    theta_step_bound: float = 0.0
    """Simulation only (deployed participants read their node config): the
    largest change per element and round a participant accepts in θ (0: 1.25×
    the largest step the server optimiser allows, ≈ 16·lr for Adam at β1 0.9,
    β2 0.999)."""
    max_round_gap: int = 64
    """Simulation only: rounds the θ bound may grow over at most (G)."""
    max_rounds: int = 100_000
    """Simulation only: the highest round number a participant serves under one key."""
    refusal_budget: int = 3
    """Simulation only: refusals a participant gives under one key before it
    stops answering (each refusal may tell the coordinator one bit)."""
    report_metrics: bool = True
    """Simulation only: participants report episode counts and returns (these
    depend on the decrypted policy; off by default in deployment)."""

    def __post_init__(self) -> None:
        for name, value in MODE_DEFAULTS.get(self.participant_update, {}).items():
            if getattr(self, name) == UNSET[name]:
                object.__setattr__(self, name, value)

    def min_participants_for(self, k: int) -> int:
        """Resolved min-participants for k registered participants."""
        return self.min_participants or max(1, -(-k // 2))

    @property
    def hidden(self) -> tuple[int, ...]:
        """hidden-sizes parsed (ConfigError if it is not 1–3 widths in 1–512)."""
        try:
            ok = len(self.hidden_sizes) <= 32 and self.hidden_sizes.isascii()
            sizes = tuple(int(x) for x in (self.hidden_sizes if ok else "").split(","))
        except ValueError:
            sizes = ()
        if not 1 <= len(sizes) <= 3 or not all(1 <= n <= 512 for n in sizes):
            raise ConfigError(
                "hidden-sizes: expected 1-3 comma-separated widths in 1..512, "
                f"e.g. '64,64', received {self.hidden_sizes[:40]!r}"
            )
        return sizes

    @property
    def layer_bound_rules(self) -> tuple[tuple[str, float], ...]:
        """layer-bounds parsed: (prefix, G) pairs, longest prefix first."""
        return parse_layer_bounds(self.layer_bounds)

    @property
    def hyper(self) -> AdamHyper:
        """HE-Adam constants."""
        return AdamHyper(
            lr=self.lr,
            beta1=self.beta1,
            beta2=self.beta2,
            rsqrt_a=self.rsqrt_a,
            u_max=(1 - self.beta2) / self.beta2 / self.adam_floor
            if self.adam_floor > 0
            else 1.0,
            anneal_steps=self.num_rounds if self.anneal_lr else 0,
        )

    @property
    def rounds_per_rollout(self) -> int:
        """E×M rounds use one rollout."""
        return self.update_epochs * self.num_minibatches

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from a run-config mapping (kebab-case keys), validating it."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name not in fields:
                continue  # other apps' keys may share the run config
            default = fields[name].default
            try:
                if isinstance(default, bool) and isinstance(value, str):
                    if value.lower() not in ("true", "false"):
                        raise ValueError(value)
                    value = value.lower() == "true"
                kwargs[name] = type(default)(value)
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(
                    f"run config {key!r}: expected {type(default).__name__}, "
                    f"received {value!r}"
                ) from None
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first impossible value."""
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"backend: expected one of {BACKENDS}, received {self.backend!r}"
            )
        ps = get_param_set(self.param_set)
        if ":" in self.env_id:  # gymnasium imports "module:Env" before making it
            raise ConfigError(
                f"env-id: expected a registered gymnasium id without ':', received "
                f"{self.env_id!r}"
            )
        self.hidden  # noqa: B018 (parses and checks hidden-sizes)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer: expected one of {OPTIMIZERS}, received {self.optimizer!r}"
            )
        for key, value, allowed in (
            ("participant-update", self.participant_update, ("gradient", "delta")),
            ("local-optimizer", self.local_optimizer, ("sgd", "adam")),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"{key}: expected one of {allowed}, received {value!r}"
                )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                key = f.name.replace("_", "-")
                raise ConfigError(f"{key}: must be finite, received {value!r}")
        if not (self.adam_floor == 0 or 1e-9 <= self.adam_floor <= 1e6):
            raise ConfigError(
                f"adam-floor: must be 0 or in [1e-9, 1e6], received {self.adam_floor!r}"
            )
        if self.update_epochs * self.num_minibatches > MAX_MINIBATCHES:
            raise ConfigError(
                f"update-epochs × num-minibatches: at most {MAX_MINIBATCHES}, "
                f"received {self.update_epochs} × {self.num_minibatches}"
            )
        if not self.local_grad_norm >= 0:
            raise ConfigError(
                f"local-grad-norm: must be >= 0, received {self.local_grad_norm!r}"
            )
        if self.optimizer == "exact-adam" and self.backend != "plain":
            raise ConfigError("optimizer 'exact-adam' runs only with backend 'plain'")
        if self.backend == "ckks" and ps.depth < HE_ADAM_DEPTH:
            raise ConfigError(
                f"param-set {self.param_set!r} has depth {ps.depth}; HE-Adam needs "
                f"{HE_ADAM_DEPTH}"
            )
        positive = {
            "num-participants": self.num_participants,
            "num-rounds": self.num_rounds,
            "lr": self.lr,
            "local-lr": self.local_lr,
            "clip-bound": self.clip_bound,
            "num-envs": self.num_envs,
            "num-steps": self.num_steps,
            "update-epochs": self.update_epochs,
            "num-minibatches": self.num_minibatches,
            "reward-scale": self.reward_scale,
            "checkpoint-every": self.checkpoint_every,
            "round-timeout": self.round_timeout,
        }
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{key}: must be > 0, received {value!r}")
        # m is stored scaled by β1 and gradients by c = √((1 − β2)/β2): never 0;
        # fedavgm's steps add up to 1/(1 − β1) times one
        for key, value, low, high in (
            ("beta1", self.beta1, 0.0, 0.999),
            ("beta2", self.beta2, 0.5, 0.99999),
        ):
            if not low < value <= high:
                raise ConfigError(
                    f"{key}: must be in ({low:g}, {high:g}], received {value!r}"
                )
        for key, value in {"gamma": self.gamma, "gae-lambda": self.gae_lambda}.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}: must be in [0, 1], received {value!r}")
        if not 3.0 <= self.rsqrt_a <= 6.0:
            raise ConfigError(
                f"rsqrt-a: must be in [3, 6] (3 = Newton's step; r stays positive "
                f"while V'·r²/β2 < A, errors shrink by (A − 3)/(A − 1) per step), "
                f"received {self.rsqrt_a!r}"
            )
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ConfigError(
                f"num-minibatches {self.num_minibatches} must divide the rollout "
                f"size {self.num_envs * self.num_steps}"
            )
        if not 0 <= self.min_participants <= self.num_participants:
            raise ConfigError(
                f"min-participants: must be in [0, num-participants="
                f"{self.num_participants}], received {self.min_participants}"
            )
        if not -1 <= self.coordinator_workers <= 64:
            raise ConfigError(
                "coordinator-workers: must be -1 (one per core), 0 or 1 (in-process "
                f"only) or 2..64, received {self.coordinator_workers}"
            )
        parse_layer_bounds(self.layer_bounds)  # ConfigError if malformed
        for key, value, low in (
            ("key-run-id", self.key_run_id, 0),
            ("max-round-gap", self.max_round_gap, 1),
            ("max-rounds", self.max_rounds, 1),
            ("refusal-budget", self.refusal_budget, 1),
        ):
            if value < low:
                raise ConfigError(f"{key}: must be >= {low}, received {value}")
        if not 0.0 <= self.theta_step_bound < float("inf"):
            raise ConfigError(
                f"theta-step-bound: must be >= 0 (0: 1.25× the largest Adam step), "
                "received "
                f"{self.theta_step_bound!r}"
            )
        top = min(22, ps.max_mask_bits)
        if not 1 <= self.mask_bits <= top:
            why = f" (param-set {ps.id!r}: the masked state must fit its bottom prime)"
            raise ConfigError(
                f"mask-bits: must be in [1, {top}], received {self.mask_bits}"
                + (why if top < 22 else "")
            )


def parse_layer_bounds(spec: str) -> tuple[tuple[str, float], ...]:
    """Parse ``'prefix=G,...'``; (prefix, G) pairs, longest prefix first."""
    rules: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        prefix, sep, value = (part.strip() for part in entry.partition("="))
        try:
            bound = float(value) if sep and prefix else float("nan")
        except ValueError:
            bound = float("nan")
        if not bound > 0 or bound == float("inf"):
            raise ConfigError(
                f"layer-bounds: expected 'layer-prefix=bound' with a finite bound "
                f"> 0, received {entry!r}"
            )
        if prefix in rules:
            raise ConfigError(f"layer-bounds: prefix {prefix!r} given twice")
        rules[prefix] = bound
    return tuple(sorted(rules.items(), key=lambda rule: -len(rule[0])))


def expand_dir(value: str) -> Path:
    """Absolute path: ``~`` expanded, relative paths placed under ~/.hedrl."""
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = Path.home() / ".hedrl" / path
    return path
