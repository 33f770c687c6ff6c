"""Reading a participant's reply: metrics, gradient, round-1 squares, refresh.

Every header is checked here, before any ciphertext is parsed; the gradient
and refresh chunks stay bytes until the step parses them (in the workers when
there are any, see :mod:`coordinator.workers`). Nothing here touches the
coordinator's state, so a rejected reply leaves it unchanged and the round
continues without it.
"""

from __future__ import annotations

import logging
import math
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from protocol import messages as msg
from protocol.adam import StateUnits
from protocol.backend import Backend, Ct
from protocol.errors import HedrlError, ReplyRejected
from protocol.records import read_vector
from protocol.wire import Expect

log = logging.getLogger("flwr.hedrl.coordinator")

ExpectFor = Callable[..., Expect]
"""``Federation.expect``: ``(kind, level, round_, name=None) -> Expect``."""

#: largest episode or environment-step count a reply may report for one round
MAX_COUNT = 10**9
#: largest |return| per reported episode (|return-sum| ≤ this · episodes);
#: the rewards of the supported environments are orders of magnitude below
MAX_ABS_RETURN_PER_EPISODE = 1e6
#: largest seconds a participant may report for one stage
MAX_STAGE_SECONDS = 1e6
#: the metrics a train reply carries; episodes and return-sum come together or
#: not at all (a participant may switch episode reporting off)
REQUIRED_METRICS = ("env-steps",)
EPISODE_METRICS = ("episodes", "return-sum")
TIME_PREFIX = "time-"


def vector_bytes(rd: RecordDict) -> int:
    """Bytes ``rd`` carries: its config records' bytes values and its arrays."""
    total = 0
    for value in rd.values():
        if isinstance(value, ConfigRecord):
            for v in value.values():
                items = v if isinstance(v, list) else [v]
                total += sum(len(b) for b in items if isinstance(b, bytes))
        elif isinstance(value, Mapping):
            for a in value.values():
                data = getattr(a, "data", None)
                if isinstance(data, bytes | bytearray):
                    total += len(data)
    return total


@dataclass
class Reply:
    """One participant's reply, headers validated (ciphertexts parse at the step)."""

    node: int
    gradient: list[bytes]
    squares: list[Ct] | None
    refresh: list[list[bytes]] | None  # per state name, per chunk (still masked)
    masks: list[np.ndarray] | None
    episodes: int | None  # None: the participant reports no episodes
    return_sum: float | None
    env_steps: int
    gradient_bytes: int
    stage_s: dict[str, float] = field(default_factory=dict)  # participant timings
    squares_chunks: list[bytes] | None = None  # round 1, as received (the ledger)
    sealed: bytes = b""  # the same update sealed for the key holders (relayed)


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
        ``Federation.expect``, which fills in the run's header fields.
    squares : bool
        Whether the reply carries Σ w·g² (round 1, before there is a state).
    """
    top = be.top_level
    episodes, return_sum, env_steps, stage_s = read_metrics(content, node)
    _, grad = read_vector(content, msg.GRADIENT, expect("gradient", top, t))
    sq = sq_chunks = None
    if squares:
        _, sq_chunks = read_vector(content, msg.SQUARES, expect("squares", top, t))
        sq = [be.load(c, level=top) for c in sq_chunks]
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
    up = content.get(msg.RELAY_UP)
    sealed = up.get("sealed") if isinstance(up, ConfigRecord) else None
    # a sealed update holds at most two float64 vectors of the layout's size
    limit = 2 * 8 * expect("gradient", top, t).slot_count * len(grad) + 4096
    if type(sealed) is not bytes or not 0 < len(sealed) <= limit:
        raise ReplyRejected(
            participant=node,
            reason=f"{msg.RELAY_UP}: expected the sealed update (bytes, at most "
            f"{limit})",
        )
    return Reply(
        node,
        grad,
        sq,
        refresh,
        masks,
        episodes,
        return_sum,
        env_steps,
        gbytes,
        stage_s,
        sq_chunks,
        sealed,
    )


def read_metrics(
    content: RecordDict, node: int
) -> tuple[int | None, float | None, int, dict[str, float]]:
    """A train reply's metrics, range-checked: (episodes, return-sum, env-steps,
    seconds per participant stage), or :class:`ReplyRejected` naming the
    participant and the field.

    ``env-steps`` is required; ``episodes`` and ``return-sum`` come together
    or not at all (None); ``time-<stage>`` keys are optional (unknown stages
    are checked, then ignored). Counts are integral in [0, :data:`MAX_COUNT`],
    |return-sum| ≤ :data:`MAX_ABS_RETURN_PER_EPISODE` · episodes (0 without episodes),
    seconds in [0, :data:`MAX_STAGE_SECONDS`); any other key is refused.
    """
    metrics = content.get(msg.METRICS)
    if not isinstance(metrics, MetricRecord | ConfigRecord):
        got = "none" if metrics is None else type(metrics).__name__
        raise ReplyRejected(
            participant=node, reason=f"metrics: expected a MetricRecord, received {got}"
        )

    def bad(key: str, expected: str) -> ReplyRejected:
        value = short_repr(metrics[key]) if key in metrics else "nothing"
        return ReplyRejected(
            participant=node,
            reason=f"metrics field {short_repr(key)}: expected {expected}, "
            f"received {value}",
        )

    known = {*REQUIRED_METRICS, *EPISODE_METRICS}
    for key in metrics:
        if key not in known and not key.startswith(TIME_PREFIX):
            raise bad(key, f"no such field (known: {sorted(known)}, {TIME_PREFIX}*)")
    counts = f"an integer in [0, {MAX_COUNT}]"
    env_steps = _count(metrics, "env-steps")
    if env_steps is None:
        raise bad("env-steps", counts)
    episodes: int | None = None
    return_sum: float | None = None
    present = [k for k in EPISODE_METRICS if k in metrics]
    if present:
        if len(present) != len(EPISODE_METRICS):
            missing = next(k for k in EPISODE_METRICS if k not in metrics)
            raise bad(missing, f"it beside {present[0]!r} (both or neither)")
        episodes = _count(metrics, "episodes")
        if episodes is None or episodes > env_steps:  # an episode takes a step
            raise bad("episodes", f"{counts}, at most env-steps ({env_steps})")
        # no episodes, no return: one reply must not move the round's mean
        limit = MAX_ABS_RETURN_PER_EPISODE * episodes
        return_sum = _number(metrics["return-sum"])
        if return_sum is None or abs(return_sum) > limit:
            raise bad("return-sum", f"a number with |value| ≤ {limit:g}")
    stage_s = {}
    for key in metrics:
        if not key.startswith(TIME_PREFIX):
            continue
        value = _number(metrics[key])
        if value is None or not 0.0 <= value < MAX_STAGE_SECONDS:
            raise bad(key, f"seconds in [0, {MAX_STAGE_SECONDS:g})")
        stage = key[len(TIME_PREFIX) :]
        if stage in msg.PARTICIPANT_STAGES:
            stage_s[stage] = value
    return episodes, return_sum, env_steps, stage_s


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut short: a rejected value is echoed into the run's logs."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    return r.repr(value)


def _number(value: object) -> float | None:
    """``value`` as a finite float, or None (bools and non-numbers included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and abs(value) > MAX_COUNT * MAX_ABS_RETURN_PER_EPISODE:
        return None  # beyond any bound here (and beyond float for huge ints)
    out = float(value)
    return out if math.isfinite(out) else None


def _count(metrics: Any, key: str) -> int | None:
    """``metrics[key]`` as an integral count in [0, MAX_COUNT], or None."""
    value = _number(metrics.get(key))
    if value is None or not value.is_integer() or not 0 <= value <= MAX_COUNT:
        return None
    return int(value)


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
