"""Reading a participant's reply: metrics, gradient, round-1 squares, refresh.

Every header is checked here, before any ciphertext is parsed; the gradient
and refresh chunks stay bytes until the step parses them (in the workers when
there are any, see :mod:`coordinator.workers`). Nothing here touches the
coordinator's state, so a rejected reply leaves it unchanged and the round
continues without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from protocol import messages as msg
from protocol.adam import StateUnits
from protocol.backend import Backend, Ct
from protocol.codec import receive_cts
from protocol.errors import HedrlError, WireFormatError
from protocol.records import read_vector
from protocol.wire import Expect

log = logging.getLogger("flwr.hedrl.coordinator")

ExpectFor = Callable[..., Expect]
"""``Federation._expect``: ``(kind, level, round_, name=None) -> Expect``."""


def vector_bytes(rd: RecordDict) -> int:
    """Bytes ``rd`` carries: its config records' bytes values and its arrays."""
    total = 0
    for value in rd.values():
        if isinstance(value, ConfigRecord):
            total += sum(len(v) for v in value.values() if isinstance(v, bytes))
        elif hasattr(value, "values"):
            total += sum(len(a.data) for a in value.values() if hasattr(a, "data"))
    return total


@dataclass
class Reply:
    """One participant's reply, headers validated (ciphertexts parse at the step)."""

    node: int
    gradient: list[bytes]
    squares: list[Ct] | None
    refresh: list[list[bytes]] | None  # per state name, per chunk (still masked)
    masks: list[np.ndarray] | None
    episodes: int
    return_sum: float
    env_steps: int
    gradient_bytes: int
    stage_s: dict[str, float] = field(default_factory=dict)  # participant timings


def read_refresh(
    content: RecordDict, t: int, expect: ExpectFor, levels: Sequence[int]
) -> list[list[bytes]]:
    """A refresher's masked m, V, r chunks of round ``t``, headers checked, or raise."""
    return [
        read_vector(
            content,
            msg.state_key("refresh", name),
            expect("refresh", level, t, name),
        )[1]
        for name, level in zip(msg.STATE_NAMES, levels, strict=True)
    ]


def parse_reply(
    content: RecordDict,
    *,
    t: int,
    node: int,
    masks: list[np.ndarray] | None,
    be: Backend,
    expect: ExpectFor,
    squares: bool,
) -> Reply:
    """Validate one train reply completely (headers before ciphertexts) or raise.

    Parameters
    ----------
    content : RecordDict
        The reply's content.
    t : int
        The round.
    node : int
        The participant's node id.
    masks : list of numpy.ndarray or None
        The masks sent to it if it is a refresher this round, else None; an
        unusable refresh is logged and dropped, not a reason to reject.
    be : Backend
        The coordinator's (evaluation-only) backend.
    expect : callable
        ``Federation._expect``, which fills in the run's header fields.
    squares : bool
        Whether the reply carries Σ w·g² (round 1, before there is a state).
    """
    top = be.top_level
    metrics = content.get(msg.METRICS)
    if metrics is None:
        raise WireFormatError("reply carries no metrics record")
    try:
        env_steps = int(metrics["env-steps"])
        episodes, return_sum = 0, 0.0  # a participant may not report episodes
        if "episodes" in metrics or "return-sum" in metrics:
            episodes = int(metrics["episodes"])
            return_sum = float(metrics["return-sum"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WireFormatError(f"metrics record malformed: {exc}") from exc
    if episodes < 0 or env_steps < 0 or not np.isfinite(return_sum):
        raise WireFormatError(
            f"metrics out of range: episodes={episodes}, env-steps={env_steps}, "
            f"return-sum={return_sum}"
        )
    stage_s = _stage_seconds(metrics)
    _, grad = read_vector(content, msg.GRADIENT, expect("gradient", top, t))
    sq = None
    if squares:
        sq = receive_cts(be, content, msg.SQUARES, expect("squares", top, t))
    refresh = None
    if masks is not None:
        try:
            refresh = read_refresh(content, t, expect, StateUnits.levels(top))
        except HedrlError as exc:
            log.warning(
                "hedrl: round %d: refresh of participant %d unusable: %s",
                t,
                node,
                exc,
            )
            refresh = None
    gbytes = vector_bytes(
        RecordDict({k: content[k] for k in (msg.GRADIENT, msg.GRADIENT + ".hdr")})
    )
    return Reply(
        node, grad, sq, refresh, masks, episodes, return_sum, env_steps, gbytes, stage_s
    )


def _stage_seconds(metrics: Any) -> dict[str, float]:
    """The participant's per-stage seconds (optional; for the round's breakdown)."""
    out = {}
    for stage in msg.PARTICIPANT_STAGES:
        key = msg.stage_time_key(stage)
        if key not in metrics:
            continue
        try:
            value = float(metrics[key])
        except (TypeError, ValueError) as exc:
            raise WireFormatError(f"metrics record malformed: {key}: {exc}") from exc
        if not (np.isfinite(value) and 0.0 <= value < 1e6):
            raise WireFormatError(f"metrics out of range: {key}={value}")
        out[stage] = value
    return out


def participant_stages(replies: list[Reply]) -> dict[str, float]:
    """The round's participant-side breakdown: per stage, the slowest reply's
    seconds (``participant/<stage>_s``), and ``participant/busy_s``, the largest
    sum of one reply's stages (the participants' share of the critical path,
    transport and waiting excluded), and ``participant/total_s``, the sum over
    all replies (their CPU cost when they share cores)."""
    timed = [r.stage_s for r in replies if r.stage_s]
    if not timed:
        return {}
    out = {
        f"participant/{stage}_s": max(s.get(stage, 0.0) for s in timed)
        for stage in msg.PARTICIPANT_STAGES
    }
    per_reply = [sum(s.values()) for s in timed]
    out["participant/busy_s"] = max(per_reply)
    out["participant/total_s"] = sum(per_reply)
    return out
