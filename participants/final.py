"""A participant's end of a run: the final θ, and the others' tags on it.

The final θ is checked like any θ and kept for hedrl-release
(:class:`participants.guard.Guard`); the participant returns a tag on its
ciphertext bytes, HMAC-SHA256 under a key only key holders derive, and later
compares the other participants' tags with its own ciphertext: a majority of
the federation must have received the same one before it can be released.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, RecordDict

from participants.guard import final_tag
from participants.twin import TwinStore
from protocol import messages as msg
from protocol.errors import KeyMaterialError, WireFormatError
from protocol.records import digest

if TYPE_CHECKING:
    from participants.node import Node

log = logging.getLogger("flwr.hedrl.participant")
TAG_BYTES = 32  # HMAC-SHA256


def final(node: Node, content: RecordDict) -> RecordDict:
    """The run's last θ: check it like any θ, keep its twin for hedrl-release
    and return a tag on its ciphertext bytes for the others to compare."""
    node._content = content
    _, t = node._task(content)
    be, fp, guard = node._key()
    guard.admit("final", t)
    got = node._receive(
        be, msg.THETA, node._expect(fp, "theta", 0, t), node.learner.layout.size
    )
    if be.mac_key is None:  # a participant backend always has one
        raise KeyMaterialError("no MAC key: not a participant's context")
    checked = node._relay(be, guard, content)
    out = RecordDict()
    with guard.decrypting(("final",), t):
        theta, twin, snapshots = node._theta(be, got, t, guard, checked)
        # the tag covers the ciphertext and the twin's chain: participants
        # confirm the same final θ only if they replayed the same steps
        d = f"{digest(got.chunks)}:{checked.relay.head_hash}"
        layout = node.learner.layout
        guard.store_final(  # the twin: what a release may publish
            twin,
            t,
            {
                "digest": d,
                "env_id": node.cfg.env_id,
                "continuous": node.learner.continuous,
                "names": list(layout.names),
                "shapes": [list(s) for s in layout.shapes],
                "param_set": node.params.id,
                "backend": node.cfg.backend,
            },
        )
        TwinStore(guard.stem).save(snapshots)
        guard.accept_theta(theta, t, d)
        out[msg.FINAL_REPLY] = ConfigRecord(
            {
                "tag": final_tag(be.mac_key, d, t, node.index),
                "participant-index": node.index,
            }
        )
    return out


def confirm(node: Node, content: RecordDict) -> RecordDict:
    """Compare the other participants' tags with this one's final θ: a
    majority of the federation must have received the same ciphertext
    before hedrl-release will release it."""
    node._content = content
    _, t = node._task(content)
    be, _, guard = node._key()
    guard.admit("confirm", t)
    rec = content.get(msg.FINAL_TAGS)
    if not isinstance(rec, ConfigRecord):
        raise WireFormatError("confirm carries no tags record")
    indices, tags = rec.get("indices"), rec.get("tags")
    if (
        not isinstance(indices, list)
        or not isinstance(tags, list)
        or len(indices) != len(tags)
        or len(set(indices)) != len(indices)
        or not all(isinstance(i, int) and 0 <= i < 2**31 for i in indices)
        or not all(isinstance(g, bytes) and len(g) == TAG_BYTES for g in tags)
    ):
        raise WireFormatError(
            "confirm: tags must be distinct indices with 32-byte tags"
        )
    if be.mac_key is None:
        raise KeyMaterialError("no MAC key: not a participant's context")
    guard.handled("confirm", t)
    valid = guard.confirm_final(t, dict(zip(indices, tags, strict=True)), be.mac_key)
    log.info(
        "hedrl: participant %d: final θ of round %d confirmed by %d participants; "
        "hedrl-release can release it",
        node.index,
        t,
        valid,
    )
    return RecordDict({msg.FINAL_REPLY: ConfigRecord({"confirmed": valid})})
