"""Flower ClientApp of a hedrl participant: decrypt θ, learn locally, encrypt.

Crypto happens only at the message boundary (:mod:`protocol.codec`); the RL
code in :mod:`participants.learner` never sees a key or a ciphertext.

In deployment (flwr 1.42) every message starts a fresh ``flwr-clientapp``
process, so this module imports nothing heavy: TenSEAL, gymnasium and the
participant's code are imported inside the handlers. Each handler logs one
line with where the message's time went, starting at the process's birth
(``process``: Python start-up, Flower's own imports, pulling the message and
installing the app bundle — all before the handler runs).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

if TYPE_CHECKING:
    from participants.learner import GradientSource

log = logging.getLogger("flwr.hedrl.participant")
_handled = 0  # messages this process has handled so far


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _handle(
    kind: str,
    message: Message,
    context: Context,
    gradients: GradientSource | None = None,
) -> Message:
    age = process_age()
    t0 = time.perf_counter()
    from participants.node import Node

    imported = time.perf_counter()
    node = Node(context, gradients)
    node.timings["import"] = imported - t0
    try:
        content = getattr(node, kind)(message.content)
    finally:
        node.close()
    node.timings["handler"] = time.perf_counter() - t0
    global _handled
    _handled += 1
    # A process's first message carries its start-up cost: that line is INFO
    # (in deployment every message is a fresh process). Later messages in a
    # long-lived simulation process log at DEBUG, or sweeps drown in them.
    log.log(
        logging.INFO if _handled == 1 else logging.DEBUG,
        "hedrl: participant %d %s%s: %s",
        node.index,
        kind,
        "" if node.round is None else f" round {node.round}",
        ", ".join(
            ([] if age is None else [f"process {age:.2f} s before the handler"])
            + [f"{k} {v:.3f}" for k, v in node.timings.items()]
        ),
    )
    return Message(content, reply_to=message)


def make_app(gradients: GradientSource | None = None) -> ClientApp:
    """The hedrl ClientApp; ``gradients`` replaces the participants' PPO step
    (benchmarks replay recorded gradients through it; deployments and
    simulations use :data:`app`, which has none)."""
    app = ClientApp()

    @app.query("setup")
    def setup(message: Message, context: Context) -> Message:
        """Provision/load the key, report fingerprint and layout (and context, θ0)."""
        return _handle("setup", message, context, gradients)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        """One round: check and decrypt θ, compute one PPO gradient, encrypt it."""
        return _handle("train", message, context, gradients)

    @app.query("refresh")
    def refresh(message: Message, context: Context) -> Message:
        """Spare refresher: re-encrypt the masked m, V, r when the refresher failed."""
        return _handle("refresh", message, context, gradients)

    @app.query("v0")
    def v0(message: Message, context: Context) -> Message:
        """Round 1 refresher task: V0 = mean g² + δ and r0 = V0^(−1/2) from the sum."""
        return _handle("initial_state", message, context, gradients)

    @app.query("final")
    def final(message: Message, context: Context) -> Message:
        """After the last round: check the final θ, keep its twin, tag it."""
        return _handle("final", message, context, gradients)

    @app.query("confirm")
    def confirm(message: Message, context: Context) -> Message:
        """Compare every participant's tag on the final θ with this one's."""
        return _handle("confirm", message, context, gradients)

    return app


app = make_app()


__all__ = ["app", "make_app", "process_age"]
