"""Checkpoints of a run and resuming from one.

A periodic checkpoint holds the last θ a majority of participants accepted
(:class:`Good`), never one nobody has checked yet; the final one holds the
run's last state. Resuming checks that the checkpoint belongs to this
backend, parameter set and environment (:func:`load_resume`, at construction)
and, once the participants' key is known, to their key and layout
(:func:`resume_state`, at setup).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from protocol import PROTOCOL_VERSION, STATE_UNITS_VERSION
from protocol import messages as msg
from protocol.backend import Backend, Ct
from protocol.checkpoint import read_checkpoint, write_checkpoint
from protocol.config import RunConfig
from protocol.errors import ConfigError, FingerprintMismatch, HeaderMismatch

if TYPE_CHECKING:
    from coordinator.federation import Federation

log = logging.getLogger("flwr.hedrl.coordinator")

State = list[tuple[Ct, Ct, Ct]]
"""m, V, r per chunk."""
Resume = tuple[dict[str, Any], dict[str, list[bytes]]]
"""A checkpoint's metadata and its vectors (per name, per chunk)."""


class Good(NamedTuple):
    """θ a majority accepted in round ``step + 1``, with the state it came with."""

    theta: list[Ct | bytes]
    state: State | None
    step: int
    head: int  # the step whose output θ is (0: θ0; the ledger's parent)


def load_resume(path: Path, cfg: RunConfig, param_set: str) -> Resume:
    """Read the checkpoint to resume from; raise ConfigError if it does not fit.

    It must come from a run with this backend, parameter set and environment,
    and stop before ``cfg.num_rounds``. Old checkpoints without a
    ``key_run_id`` used the key of their own run.
    """
    try:
        meta, vectors = read_checkpoint(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"resume-from {path}: unreadable checkpoint: {exc}") from exc
    for key, want in (
        ("backend", cfg.backend),
        ("param_set", param_set),
        ("env_id", cfg.env_id),
    ):
        if meta.get(key) != want:
            raise ConfigError(
                f"resume-from {path}: checkpoint {key} is {meta.get(key)!r}, "
                f"this run's is {want!r}"
            )
    written = int(meta.get("protocol_version", 1))
    if written < STATE_UNITS_VERSION and all(n in vectors for n in msg.STATE_NAMES):
        raise ConfigError(
            f"resume-from {path}: checkpoint was written by protocol version "
            f"{written}, whose m, V, r are in other units than version "
            f"{PROTOCOL_VERSION}'s; its θ can still be released, not resumed"
        )
    if all(n in vectors for n in msg.STATE_NAMES):
        _check_state_hyper(path, meta.get("state_hyper", {}), cfg)
    if int(meta["step"]) >= cfg.num_rounds:
        raise ConfigError(
            f"resume-from {path}: checkpoint is at step {meta['step']}, "
            f"num-rounds is {cfg.num_rounds}: nothing left to run"
        )
    meta.setdefault("key_run_id", meta["run_id"])
    return meta, vectors


def _state_hyper(cfg: RunConfig) -> dict[str, float]:
    """The run-config values m, V and r's units depend on (StateUnits)."""
    hp = cfg.hyper
    return {"beta1": hp.beta1, "beta2": hp.beta2, "rsqrt_a": hp.rsqrt_a}


def _check_state_hyper(path: Path, written: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse state whose units came from other HE-Adam constants.

    Checkpoints from before ``state_hyper`` was written had rsqrt-a 3 (the
    only value then) and are checked for that alone.
    """
    written = written or {"rsqrt_a": 3.0}
    ours = _state_hyper(cfg)
    for key, value in written.items():
        if key in ours and float(value) != ours[key]:
            raise ConfigError(
                f"resume-from {path}: checkpoint's m, V, r were written with "
                f"{key.replace('_', '-')} {value!r}, this run's is {ours[key]!r}; "
                "their units differ (resume with the checkpoint's value)"
            )


def resume_state(
    be: Backend,
    meta: dict[str, Any],
    vectors: dict[str, list[bytes]],
    *,
    fingerprint: str,
    layout_digest: str,
) -> tuple[list[Ct], State | None, int]:
    """The checkpoint's θ, its m, V, r (None if it has none) and its step.

    Raises FingerprintMismatch or HeaderMismatch unless the checkpoint was
    written for the participants' key (``fingerprint``) and policy layout.
    """
    if meta["fingerprint"] != fingerprint:
        raise FingerprintMismatch(
            expected=meta["fingerprint"],
            received=fingerprint,
            where="participants' key vs checkpoint",
        )
    if meta["layout_digest"] != layout_digest:
        raise HeaderMismatch(
            field="layout_digest",
            expected=meta["layout_digest"],
            received=layout_digest,
        )
    levels = meta["levels"]
    theta = [be.load(c, level=int(levels["theta"])) for c in vectors["theta"]]
    state = None
    if all(n in vectors for n in msg.STATE_NAMES):
        per = [
            [be.load(c, level=int(levels[n])) for c in vectors[n]]
            for n in msg.STATE_NAMES
        ]
        state = list(zip(*per, strict=True))
    step = int(meta["step"])
    log.info(
        "hedrl: resumed from a checkpoint at step %d (key of run %s)",
        step,
        int(meta["key_run_id"]),
    )
    return theta, state, step


def checkpoint(fed: Federation, t: int, *, final: bool = False) -> Path | None:
    """Write ``fed``'s θ, m, V, r and step counter atomically to
    ``checkpoint.npz`` in its results directory.

    A periodic checkpoint holds the last θ a majority of participants accepted
    (with the state and step count it came with), never a θ that nobody has
    checked yet: a coordinator that crashes right after a forged or corrupted
    step resumes from a state its key holders vouched for. The final
    checkpoint holds the run's last state (the final θ sent to participants).
    """
    path = fed.out_dir / "checkpoint.npz"
    if final:
        theta, state, step, head = fed.theta, fed.state, t, fed.head
    elif fed.good is None:
        log.info("hedrl: round %d: no accepted θ yet, no checkpoint", t)
        return None
    else:
        theta, state, step, head = fed.good
    vectors = {"theta": [fed.be.to_bytes(c) for c in theta]}
    levels = {"theta": 0}
    if state is not None:
        for j, name in enumerate(msg.STATE_NAMES):
            vectors[name] = [fed.be.dump(c[j]) for c in state]
            levels[name] = state[0][j].level
    meta = {
        "protocol_version": PROTOCOL_VERSION,
        "step": step,
        "head": head,
        "run_id": fed.run_id,
        "key_run_id": fed.key_run_id,
        "backend": fed.cfg.backend,
        "param_set": fed.params.id,
        "fingerprint": fed.fingerprint,
        "layout_digest": fed.layout_digest,
        "param_count": fed.param_count,
        "levels": levels,
        "env_id": fed.cfg.env_id,
        "state_hyper": _state_hyper(fed.cfg),
        # the round (as sent) in which participants accept(ed) this θ
        "wire_round": fed.wire(step + 1),
    }
    write_checkpoint(path, meta, vectors)
    return path
