"""A round's stages before the step, and the record that carries its data.

:meth:`coordinator.federation.Federation.run_round` calls them in order:
:func:`broadcast` (θ to everyone, the masked state to the round's refresher),
the exchange, :func:`collect` (each reply checked on its own: one that fails is
rejected, the round goes on), :func:`decide` (step, skip, or roll back when a
majority refused θ). What they produce goes into one :class:`Round`, which
also makes the round's ``metrics.jsonl`` row.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from flwr.app import Message, RecordDict

from coordinator.exchange import error_reason
from coordinator.replies import Reply, parse_reply, participant_stages, vector_bytes
from protocol import messages as msg
from protocol.errors import HedrlError, ReplyRejected

if TYPE_CHECKING:
    from coordinator.federation import Federation

log = logging.getLogger("flwr.hedrl.coordinator")

#: the type a participant's error names when it could not replay a relay
RELAY_ERROR = "RelayError"

Decision = Literal["step", "skip", "rollback"]


@dataclass
class Spare:
    """The spare refresher a round asked, if its refresher failed."""

    node: int | None = None
    down: int = 0
    up: int = 0


@dataclass
class Broadcast:
    """What :func:`broadcast` sent."""

    messages: list[Message]
    refreshers: list[int]
    masks: dict[int, list[np.ndarray]]  # per refresher, name-major
    down: int


@dataclass
class Collected:
    """What :func:`collect` made of the replies."""

    accepted: list[Reply] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # node → why
    refused: list[int] = field(default_factory=list)  # refused θ (the code)
    up: int = 0


@dataclass
class Round:
    """One round's data, from the broadcast to its ``metrics.jsonl`` row."""

    t: int  # the HE-Adam step (metrics' "round")
    wire: int  # the round number its messages carry
    started: float
    sent: Broadcast | None = None
    got: Collected = field(default_factory=Collected)
    sent_at: float = 0.0
    received_at: float = 0.0
    rolled_back: bool | None = None
    stepped: bool = False
    spare: Spare = field(default_factory=Spare)
    timings: dict[str, float] = field(default_factory=dict)

    def drop(self, node: int, why: str) -> None:
        """Reject an accepted reply after all (its chunks did not parse)."""
        self.got.accepted = [r for r in self.got.accepted if r.node != node]
        self.got.rejected.setdefault(str(node), why)
        self.got.missing.append(node)

    def row(self, backend: str, need: int, done: float) -> dict[str, Any]:
        """The round's ``metrics.jsonl`` row; ``need`` replies must report
        episodes for the round to report a return."""
        got, sent = self.got, self.sent
        assert sent is not None
        accepted = got.accepted
        reporting = [r for r in accepted if r.episodes is not None]
        if len(reporting) < need:
            reporting = []
        episodes = sum(r.episodes or 0 for r in reporting)
        ret_sum = sum(r.return_sum or 0.0 for r in reporting)
        row: dict[str, Any] = {
            "round": self.t,
            "backend": backend,
            "refused": got.refused,
            **({} if self.rolled_back is None else {"rolled_back": self.rolled_back}),
            "return_mean": (ret_sum / episodes) if episodes else None,
            "episodes": episodes,
            "env_steps": sum(r.env_steps for r in accepted),
            "upload_bytes": got.up + self.spare.up,
            "broadcast_bytes": sent.down + self.spare.down,
            "spare_refresher": self.spare.node,
            "participants": len(accepted),
            "missing": got.missing,
            "rejected": got.rejected,
            "crypto/gradient_bytes": (
                statistics.median(r.gradient_bytes for r in accepted)
                if accepted
                else None
            ),
            # parsing included
            "coordinator_s": (self.sent_at - self.started) + (done - self.received_at),
            "round_s": done - self.started,
            "stepped": self.stepped,
            "time/exchange_s": self.received_at - self.sent_at,
            "time/prepare_s": self.sent_at - self.started,
            # CPU seconds per stage, summed over chunks (and workers)
            **{f"time/{k}": v for k, v in self.timings.items()},
            **participant_stages(accepted),
        }
        return row


def broadcast(fed: Federation, t: int, wire: int) -> Broadcast:
    """θ to every participant; the masked state to this round's refresher."""
    theta_rd, theta_bytes = fed.theta_record(wire)
    refreshers = fed.refreshers(t)
    masks: dict[int, list[np.ndarray]] = {}
    out, down = [], 0
    for node in fed.nodes:
        task = fed.task(
            wire, refresher=int(node in refreshers), init=int(fed.state is None)
        )
        content = RecordDict({msg.TASK: task})
        content[msg.THETA] = theta_rd[msg.THETA]
        content[msg.THETA + ".hdr"] = theta_rd[msg.THETA + ".hdr"]
        content[msg.RELAY] = fed.relay_record(node)
        down += theta_bytes + vector_bytes(RecordDict({msg.RELAY: content[msg.RELAY]}))
        if node in refreshers:
            _, masks[node], state_bytes = fed.masked_state(wire, into=content)
            down += state_bytes
        out.append(fed.message(node, msg.TRAIN, content, wire))
    return Broadcast(out, refreshers, masks, down)


def collect(
    fed: Federation,
    t: int,
    wire: int,
    replies: dict[int, Message | None],
    masks: dict[int, list[np.ndarray]],
) -> Collected:
    """Check every reply on its own (:func:`coordinator.replies.parse_reply`):
    any failure, expected or not, rejects that reply and names it."""
    got = Collected()
    for node in fed.nodes:
        reply = replies[node]
        if reply is None or reply.has_error():
            why = error_reason(reply)
            log.warning("hedrl: round %d: participant %d missing (%s)", t, node, why)
            got.missing.append(node)
            # a relay it could not replay is a θ it could not accept either
            if msg.REFUSED_CODE in why or RELAY_ERROR in why:
                got.refused.append(node)
            continue
        got.up += vector_bytes(reply.content)
        try:
            got.accepted.append(
                parse_reply(
                    reply.content,
                    t=wire,
                    node=node,
                    masks=masks.get(node),
                    be=fed.be,
                    expect=fed.expect,
                    squares=fed.state is None,
                )
            )
        except Exception as exc:  # one guard per reply: it never ends the run
            if not isinstance(exc, HedrlError):
                exc = ReplyRejected(
                    participant=node, reason=f"{type(exc).__name__}: {exc}"
                )
            log.warning(
                "hedrl: round %d: reply of participant %d rejected: %s: %s",
                t,
                node,
                type(exc).__name__,
                exc,
            )
            got.rejected[str(node)] = f"{type(exc).__name__}: {exc}"
            got.missing.append(node)
    return got


def decide(t: int, got: Collected, nodes: Sequence[int], need: int) -> Decision:
    """Roll back when at least half of those who answered refused θ (its
    content failed the key holders' checks); skip the step with fewer than
    ``need`` usable replies; else step. A minority refusing θ that decrypted
    fine for the others counts as missing: it cannot stall training."""
    refused, accepted = got.refused, got.accepted
    if refused and 2 * len(refused) >= len(refused) + len(accepted):
        return "rollback"
    if len(accepted) < need:
        log.warning(
            "hedrl: round %d: %d of %d participants usable (< min-participants "
            "%d); step skipped, state kept",
            t,
            len(accepted),
            len(nodes),
            need,
        )
        return "skip"
    if refused:
        log.warning(
            "hedrl: round %d: participant(s) %s refused θ that %d other(s) "
            "accepted; a minority refusal counts as missing, not as a bad θ",
            t,
            refused,
            len(accepted),
        )
    return "step"
