"""A coordinator that deviates from the protocol, for tests that play it.

It holds exactly what an honest coordinator holds after some honest rounds —
the evaluation context, every message it sent and every reply it received —
and sends whatever it likes to one participant through the real ClientApp
(in-process, :class:`benchmarks.local_grid.LocalGrid`). The participants are
*deployed* ones: their settings come from a node config (``secret-context``,
``state-dir``, the θ bound, the budget), so nothing the coordinator writes in
a task or in the run config can widen them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from coordinator.federation import Federation
from participants.guard import GuardState
from protocol import keys
from protocol import messages as msg
from protocol.backend import Ct
from protocol.params import get_param_set
from protocol.records import read_vector, write_vector
from protocol.relay import Relay, parse_relay
from protocol.wire import parse_header
from tests.helpers import local_federation, local_raw

PS = get_param_set("8k-35x3")
RUN_ID = 4242
BOUND = 0.03  # a deployed participant's theta-step-bound in these tests
GAP = 64


def deployed_federation(
    tmp: Path,
    *,
    participants: int = 3,
    rounds: int = 3,
    budget: int = 3,
    backend: str = "ckks",
    run_id: int = RUN_ID,
    finish: bool = False,
    **node: Any,
) -> Federation:
    """Run ``rounds`` honest rounds with deployed-style participants sharing one
    provisioned key (each with its own state directory); return the federation.
    With ``finish`` the run ends as a run does, with the final θ (after which
    participants decrypt nothing more under the key)."""
    bundle = tmp / "bundle"
    if not (bundle / keys.PARTICIPANT_FILE).exists():
        keys.write_keys(bundle, PS, backend, force=False)
    configs = {
        i: {
            "secret-context": str(bundle / keys.PARTICIPANT_FILE),
            "participant-index": i,
            "state-dir": str(tmp / f"state-{i}"),
            "theta-step-bound": BOUND,
            "max-round-gap": GAP,
            "refusal-budget": budget,
            "federation-size": participants,
            **node,
        }
        for i in range(participants)
    }
    raw = local_raw(
        tmp,
        **{
            "backend": backend,
            "num-rounds": rounds,
            "num-participants": participants,
            "seed": 3,
            "run-name": f"run-{run_id}",
            "coordinator-workers": 0,
            "round-timeout": 5.0,
        },
    )
    fed = local_federation(raw, run_id, node_configs=configs)
    if finish:
        fed.run()
        return fed
    fed.setup()
    for t in range(1, rounds + 1):
        fed.history.append(fed.run_round(t))
    fed.close()
    return fed


class Attacker:
    """Craft and send messages to the participants of ``fed``."""

    def __init__(self, fed: Federation, tmp: Path) -> None:
        self.fed, self.grid, self.be, self.tmp = fed, fed.grid, fed.be, tmp
        self.nodes = list(fed.nodes)
        self.honest = list(fed.grid.sent)  # what the honest run sent
        # the next round no participant has handled yet
        self.round = fed.wire(fed.cfg.num_rounds) + 1

    # ---- what it holds ----------------------------------------------------------
    def sent(self, mtype: str, node: int | None = None, key: str = "") -> Message:
        """The last message of type ``mtype`` the honest run sent (to ``node``;
        holding record ``key``)."""
        return [
            m
            for m in self.honest
            if m.metadata.message_type == mtype
            and node in (None, m.metadata.dst_node_id)
            and (not key or key in m.content)
        ][-1]

    def received(self, key: str) -> RecordDict:
        """The last reply that carried record ``key``."""
        replies = [r for r in self.grid.received if r.has_content()]
        return [r for r in replies if key in r.content][-1].content

    def guard(self, index: int) -> GuardState:
        """Participant ``index``'s guard state on disk (the test reads it; the
        coordinator cannot)."""
        (path,) = (self.tmp / f"state-{index}").glob("guard-*.json")
        import json

        return GuardState(**json.loads(path.read_text()))

    # ---- crafting ------------------------------------------------------------------
    def cts(self, content: RecordDict, key: str, level: int) -> tuple[Any, list[Ct]]:
        hdr = parse_header(content[key + ".hdr"]["header"])
        arr = content[key]
        data = bytes(arr["data"].data)
        lengths = np.frombuffer(bytes(arr["lengths"].data), "<u4").astype(int)
        ends = np.cumsum(lengths)
        chunks = [data[e - n : e] for n, e in zip(lengths, ends, strict=True)]
        return hdr, [self.be.load(c, level=level) for c in chunks]

    def put(
        self, content: RecordDict, key: str, hdr: Any, cts: list[Ct], **fields: Any
    ) -> None:
        """Write ``cts`` as vector ``key`` with header ``hdr`` (fields changed)."""
        hdr = copy.deepcopy(hdr)
        for name, value in fields.items():
            setattr(hdr, name, value)
        hdr.chunk_count = len(cts)
        write_vector(content, key, hdr, [self.be.dump(c) for c in cts])

    def train(
        self,
        node: int,
        theta: list[Ct] | None = None,
        *,
        round_: int | None = None,
        task: dict[str, Any] | None = None,
        refresher: bool = False,
    ) -> RecordDict:
        """A train message for ``node``: the honest run's last θ (or ``theta``)
        at round ``round_`` (default: the next unused round)."""
        base = self.sent(msg.TRAIN, node).content
        hdr, honest = self.cts(base, msg.THETA, 0)
        r = self.round if round_ is None else round_
        content = RecordDict(
            {
                msg.TASK: ConfigRecord(
                    {
                        "round": r,
                        "backend": self.fed.cfg.backend,
                        "refresher": int(refresher),
                        "init": 0,
                        **(task or {}),
                    }
                )
            }
        )
        self.put(content, msg.THETA, hdr, honest if theta is None else theta, round=r)
        # θ is the honest θ's step, which the participant has replayed already
        honest_relay = parse_relay(base[msg.RELAY])
        h, hh = honest_relay.head, honest_relay.head_hash
        content[msg.RELAY] = Relay(h, hh, h, hh, [], {}).record()
        return content

    def theta(self, node: int) -> list[Ct]:
        """The honest run's last θ sent to ``node`` (bottom level)."""
        return self.cts(self.sent(msg.TRAIN, node).content, msg.THETA, 0)[1]

    def gradient(self) -> list[Ct]:
        """A participant's gradient of the honest run (top level)."""
        return self.cts(self.received(msg.GRADIENT), msg.GRADIENT, self.be.top_level)[1]

    def send(self, node: int, mtype: str, content: RecordDict) -> Message:
        """Deliver one message to ``node``'s real ClientApp; its reply."""
        message = Message(
            content=content, dst_node_id=node, message_type=mtype, group_id="x"
        )
        (mid,) = self.grid.push_messages([message])
        (reply,) = self.grid.pull_messages([mid])
        return reply


def vector_of(rd: RecordDict, key: str) -> list[bytes]:
    """The chunk bytes of vector ``key`` (header not checked)."""
    hdr = parse_header(rd[key + ".hdr"]["header"])
    from protocol.wire import Expect

    return read_vector(
        rd,
        key,
        Expect(
            hdr.param_set,
            hdr.fingerprint,
            hdr.backend,
            hdr.run_id,
            hdr.layout_digest,
            hdr.slot_count,
            hdr.chunk_count,
            hdr.kind,
            hdr.level,
        ),
    )[1]
