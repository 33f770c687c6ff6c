"""What the participants' setup replies must hold, checked field by field.

A setup reply reports a participant's key fingerprint, policy layout, index,
the last round it handled under the key and the highest it serves (one also
sends the evaluation context and θ0). Every field is type- and range-checked,
and all participants must agree; anything else fails setup with a HedrlError
naming the participant and the field.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from flwr.app import ConfigRecord, Message

from coordinator.exchange import error_reason
from coordinator.replies import short_repr
from coordinator.workers import ChunkPool, auto_workers
from protocol import messages as msg
from protocol.config import RunConfig
from protocol.errors import FingerprintMismatch, HeaderMismatch, HedrlError
from protocol.params import get_param_set

log = logging.getLogger("flwr.hedrl.coordinator")

#: an evaluation context is a few MB (2.6 at 8k-35x3, ~30 at 16k-50x6)
MAX_CONTEXT_BYTES = 256 * 1024 * 1024
MAX_ROUND = 2**31 - 1  # a VectorHeader's round is a uint32


def setup_info(node: int, reply: Message | None, *, context: bool) -> dict[str, Any]:
    """One participant's setup reply, every field type- and range-checked, or a
    HedrlError naming the participant and the field."""
    if reply is None or reply.has_error():
        raise HedrlError(f"participant {node} failed setup: {error_reason(reply)}")
    record = reply.content.get(msg.SETUP_REPLY) if reply.has_content() else None
    if not isinstance(record, ConfigRecord):
        raise HedrlError(f"participant {node} failed setup: no setup record")

    def field(key: str, kind: type, ok: Callable[[Any], bool], expected: str) -> Any:
        value = record.get(key)
        if type(value) is not kind or not ok(value):
            raise HedrlError(
                f"participant {node} failed setup: {key!r}: expected {expected}, "
                f"received {short_repr(value)}"
            )
        return value

    def hex64(v: str) -> bool:
        return len(v) == 64 and all(c in "0123456789abcdef" for c in v)

    def rounds(key: str, low: int) -> int:
        ok: Callable[[int], bool] = lambda v: low <= v <= MAX_ROUND  # noqa: E731
        return field(key, int, ok, f"an int in [{low}, {MAX_ROUND}]")

    info = {
        "fingerprint": field("fingerprint", str, hex64, "64 hex digits"),
        "layout-digest": field("layout-digest", str, hex64, "64 hex digits"),
        "param-count": field(
            "param-count", int, lambda v: 1 <= v <= 10**9, "an int in [1, 1e9]"
        ),
        "participant-index": rounds("participant-index", 0),
        "last-round": rounds("last-round", 0),
        "max-rounds": rounds("max-rounds", 1),
        "twin-step": rounds("twin-step", 0),
        "twin-hash": field(
            "twin-hash", str, lambda v: v == "" or hex64(v), "64 hex digits or ''"
        ),
    }
    if context:
        info["context"] = field(
            "context",
            bytes,
            lambda v: 0 < len(v) <= MAX_CONTEXT_BYTES,
            f"bytes of an evaluation context (at most {MAX_CONTEXT_BYTES})",
        )
    return info


def agree(
    nodes: Sequence[int], infos: Sequence[dict[str, Any]], fingerprint: str
) -> dict[int, int]:
    """Check that every participant holds the key with ``fingerprint`` and the
    first one's layout and size, under distinct indices: {node: index}."""
    first = infos[0]
    for node, info in zip(nodes, infos, strict=True):
        if info["fingerprint"] != fingerprint:
            raise FingerprintMismatch(
                expected=fingerprint,
                received=str(info["fingerprint"]),
                where=f"participant {node}",
            )
        for key in ("layout-digest", "param-count"):
            if info[key] != first[key]:
                raise HeaderMismatch(
                    field=f"{key} of participant {node}",
                    expected=first[key],
                    received=info[key],
                )
    indices = [info["participant-index"] for info in infos]
    if len(set(indices)) != len(indices):
        raise HedrlError(f"participants report the same index twice: {indices}")
    return dict(zip(nodes, indices, strict=True))


def first_wire_round(
    nodes: Sequence[int],
    infos: Sequence[dict[str, Any]],
    *,
    start_round: int,
    accepted_at: int,
    num_rounds: int,
) -> int:
    """The first round to send: above every round the participants handled
    under this key, and far enough above it that the starting θ (accepted in
    round ``accepted_at``, 0 for θ0) is within their step bound of the last θ
    each accepted, which is at most (last − accepted_at) steps away. Fails if
    the run (its final θ one round after the last step) would need rounds past
    what a participant serves."""
    last = max(info["last-round"] for info in infos)
    first = start_round + 1
    if last:
        first = max(first, 2 * last - min(accepted_at, last) + 1)
        log.info(
            "hedrl: participants handled rounds up to %d under this key: this "
            "run's messages carry rounds from %d",
            last,
            first,
        )
    end = first + num_rounds - start_round
    for node, info in zip(nodes, infos, strict=True):
        if end > info["max-rounds"]:
            raise HedrlError(
                f"participant {node} serves rounds up to {info['max-rounds']} "
                f"under this key and this run would need up to {end}: resume "
                "an interrupted run with resume-from, or start with a fresh key"
            )
    return first


def make_pool(
    cfg: RunConfig, ctx_bytes: bytes, n_chunks: int, keep_aggregate: bool
) -> ChunkPool | None:
    """The coordinator's worker processes (run-config coordinator-workers;
    < 0: as many as help with ``n_chunks`` chunks), or None to work in-process."""
    workers = cfg.coordinator_workers
    if workers < 0:
        workers = auto_workers(n_chunks)
    pool = None
    if workers > 1 and not keep_aggregate:
        pool = ChunkPool(
            context=ctx_bytes,
            param_set=get_param_set(cfg.param_set).id,
            backend=cfg.backend,
            workers=workers,
            retain_memory=cfg.retain_freed_memory,
        )
    log.info(
        "hedrl: coordinator work %s",
        f"sharded over {workers} processes (this one and {workers - 1} workers)"
        if pool
        else "in-process"
        + (" (keep_aggregate: workers do not return Σx)" if workers > 1 else ""),
    )
    return pool
