"""Flower ClientApp of a hedrl participant: decrypt θ, learn locally, encrypt.

Crypto happens only at the message boundary (:mod:`protocol.codec`); the RL
code in :mod:`participants.learner` never sees a key or a ciphertext. Heavy
imports (TenSEAL, gymnasium) happen lazily inside the handlers so that the
ClientApp process starts quickly in deployment.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from protocol import messages as msg

log = logging.getLogger("flwr.hedrl.participant")
app = ClientApp()


@app.query("setup")
def setup(message: Message, context: Context) -> Message:
    """Provision/load the key, report fingerprint and layout (and context, θ0)."""
    from participants.node import Node

    return Message(Node(context).setup(message.content), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round: check and decrypt θ, compute one PPO gradient, encrypt it."""
    from participants.node import Node

    return Message(Node(context).train(message.content), reply_to=message)


@app.query("v0")
def v0(message: Message, context: Context) -> Message:
    """Round 1 refresher task: V0 = mean g² + δ and r0 = V0^(−1/2) from the sum."""
    from participants.node import Node

    return Message(Node(context).initial_state(message.content), reply_to=message)


__all__ = ["app", "msg"]
