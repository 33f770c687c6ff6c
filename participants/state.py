"""A key holder's work on the optimiser state: the refresh, and V0.

The refresher decrypts m, V, r under the coordinator's masks and re-encrypts
them, rounded, where the step uses them; the first round's key holder turns the
sum of squared gradients into m0, V0, r0. Both check what they decrypted
before they encrypt anything (a failure is one refusal,
:meth:`participants.guard.Guard.decrypting`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import RecordDict

from protocol import messages as msg
from protocol.adam import StateUnits
from protocol.adam import initial_state as adam_initial_state
from protocol.backend import Backend
from protocol.codec import Received, decrypt_received, send_plain
from protocol.errors import ThetaRejected, WireFormatError
from protocol.packing import n_chunks

if TYPE_CHECKING:
    from participants.node import Node

#: Σ w·g² of normalised gradients lies in [0, 1]; this much CKKS error is allowed
SQUARES_SLACK = 1e-3


def refresh_into(
    node: Node, be: Backend, fp: str, state_in: list[Received], t: int, out: RecordDict
) -> None:
    """Decrypt the masked m, V, r and re-encrypt them, rounded, one level
    each where the step uses them (:class:`~protocol.adam.StateUnits`)."""
    units = StateUnits.of(be, node.cfg.hyper)
    with node._timed("refresh"):
        for name, got, level in zip(
            msg.STATE_NAMES, state_in, units.levels(be.top_level), strict=True
        ):
            values = decrypt_received(be, got)
            send_plain(  # refuses non-finite or absurdly large values
                be,
                out,
                msg.state_key("refresh", name),
                units.refresh_scale(name) * values,
                node._expect(fp, "refresh", level, None, name),
                t,
            )


def refresh(node: Node, content: RecordDict) -> RecordDict:
    """Spare refresher: the round's refresher failed; refresh only."""
    node._content = content
    _, t = node._task(content)
    be, fp, guard = node._key()
    guard.admit("refresh", t)
    state_in = node._receive_state(be, fp, t)
    out = RecordDict()
    with guard.decrypting(("refresh",), t):
        refresh_into(node, be, fp, state_in, t, out)
    return out


def initial_state(node: Node, content: RecordDict) -> RecordDict:
    """Decrypt Σ w·g², return Enc(0), Enc(V0 = Σ + δ), Enc(V0^(−1/2))
    (in the step's input units, :class:`~protocol.adam.StateUnits`)."""
    node._content = content
    task, t = node._task(content)
    k = task.get("k")
    if not isinstance(k, float) or not 1.0 <= k <= node.cfg.num_participants:
        raise WireFormatError(
            f"task 'k' (K/K'): expected a float in [1, "
            f"{node.cfg.num_participants}], received {k!r}"
        )
    be, fp, guard = node._key()
    guard.admit("v0", t)
    size = n_chunks(node.learner.layout.size, node.params.slots) * node.params.slots
    got = node._receive(
        be, msg.SQUARES, node._expect(fp, "squares", be.top_level, t), size
    )
    out = RecordDict()
    with guard.decrypting(("v0",), t):
        squares = decrypt_received(be, got)
        if not (
            np.all(np.isfinite(squares))
            and np.all(squares >= -SQUARES_SLACK)
            and np.all(squares <= 1.0 + SQUARES_SLACK)
        ):
            raise ThetaRejected("squared-gradient sum is not one")
        units = StateUnits.of(be, node.cfg.hyper)
        for name, values, factor, level in zip(
            msg.STATE_NAMES,
            adam_initial_state(k * np.clip(squares, 0.0, 1.0), node.cfg.hyper),
            units.inp,
            units.levels(be.top_level),
            strict=True,
        ):
            send_plain(
                be,
                out,
                msg.state_key("v0", name),
                factor * values,
                node._expect(fp, "v0", level, None, name),
                t,
            )
    return out
