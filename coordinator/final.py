"""The end of a run: the final θ to every participant, then their tags.

Each participant checks the final θ like any θ, keeps it and returns a tag on
its ciphertext (participants/guard.py); the coordinator relays every usable
tag to each of them, and each confirms the final θ when a majority of the
federation tagged the same ciphertext. Only a confirmed final θ can be
released (hedrl-release). Nothing here can end the run unwritten: a failure is
recorded in summary.json's ``final``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, RecordDict

from coordinator.exchange import error_reason, exchange
from protocol import messages as msg

if TYPE_CHECKING:
    from coordinator.federation import Federation

log = logging.getLogger("flwr.hedrl.coordinator")

TAG_BYTES = 32  # HMAC-SHA256


def finish(fed: Federation, t: int) -> dict[str, Any]:
    """After step ``t``: send the final θ and relay the tags; summary.json's
    ``final`` (round, tags received, participants that confirmed)."""
    w = fed.wire(t + 1)
    try:
        return _finish(fed, w)
    except Exception as exc:  # the run's results are written regardless
        log.error("hedrl: final θ (round %d): %s: %s", w, type(exc).__name__, exc)
        return {"round": w, "error": f"{type(exc).__name__}: {exc}"}


def _finish(fed: Federation, w: int) -> dict[str, Any]:
    if fed.ledger is not None:
        fed.ledger.final(w, fed.head)
    theta_rd, _ = fed.theta_record(w)
    out = []
    for node in fed.nodes:
        content = RecordDict({msg.TASK: fed.task(w), msg.RELAY: fed.relay_record(node)})
        for key in (msg.THETA, msg.THETA + ".hdr"):
            content[key] = theta_rd[key]
        out.append(fed.message(node, msg.FINAL, content, w))
    replies = exchange(fed.grid, out, timeout=fed.cfg.round_timeout)
    tags: dict[int, bytes] = {}
    for node in fed.nodes:
        reply = replies[node]
        if reply is None or reply.has_error():
            log.warning("hedrl: final θ: participant %d: %s", node, error_reason(reply))
            continue
        rec = reply.content.get(msg.FINAL_REPLY)
        if not isinstance(rec, ConfigRecord):
            rec = ConfigRecord()
        tag, index = rec.get("tag"), rec.get("participant-index")
        if (
            type(tag) is bytes
            and len(tag) == TAG_BYTES
            and type(index) is int
            and index == fed.indices[node]  # what it reported at setup
        ):
            tags[index] = tag
        else:
            log.warning("hedrl: final θ: participant %d sent no usable tag", node)
    confirmed: list[int] = []
    if tags:
        record = ConfigRecord({"indices": list(tags), "tags": list(tags.values())})
        out = [
            fed.message(
                node,
                msg.CONFIRM,
                RecordDict({msg.TASK: fed.task(w), msg.FINAL_TAGS: record}),
                w,
            )
            for node in fed.nodes
        ]
        replies = exchange(fed.grid, out, timeout=fed.cfg.round_timeout)
        for node in fed.nodes:
            reply = replies[node]
            if reply is not None and not reply.has_error():
                confirmed.append(node)
            else:
                why = error_reason(reply)
                log.warning("hedrl: final θ: participant %d: %s", node, why)
    log.info(
        "hedrl: final θ (round %d) accepted by %d of %d participants and "
        "confirmed by %d; release it on a participant's host: hedrl-release "
        "--keys <its key directory> --out policy.npz",
        w,
        len(tags),
        len(fed.nodes),
        len(confirmed),
    )
    return {"round": w, "tagged": len(tags), "confirmed": confirmed}
