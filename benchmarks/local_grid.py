"""An in-process Flower ``Grid`` that delivers messages to the real ClientApp.

Used by the fidelity benchmark and by fast integration tests of the
coordinator's round loop without Ray (the transport is the only difference):
every participant gets a real ``Context`` (its own node id, node config and
persistent state) and the real ``participants.client_app.app`` handles each
message, exactly as a SuperNode would call it. Exceptions become error
replies, as in Flower.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from participants.client_app import app as client_app


class LocalGrid(Grid):
    """Routes pushed messages synchronously to in-process participants."""

    def __init__(
        self,
        run_id: int,
        run_config: dict[str, Any],
        num_nodes: int,
        node_configs: dict[int, dict[str, Any]] | None = None,
        tamper: Callable[[Message, Message], Message | None] | None = None,
        tamper_request: Callable[[Message], Message] | None = None,
        keep_history: bool = True,
        app: ClientApp = client_app,
    ) -> None:
        """``keep_history`` keeps every message in ``sent``/``received`` (tests);
        long benchmark runs turn it off (each CKKS round is ~10 MB of messages).
        ``app``: the ClientApp the nodes run (default hedrl's; benchmarks pass
        one from :func:`participants.client_app.make_app`)."""
        self.app = app
        self._run_id = run_id
        # what a ServerApp process has set when it creates messages
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
        self.contexts = {
            1000 + i: Context(
                run_id=run_id,
                node_id=1000 + i,
                node_config={
                    "partition-id": i,
                    "num-partitions": num_nodes,
                    **(node_configs or {}).get(i, {}),
                },
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.tamper = tamper
        self.tamper_request = tamper_request
        self.keep_history = keep_history

    # Grid's abstract interface ------------------------------------------------
    def set_run(self, run: Any) -> None:  # pragma: no cover - not used
        pass

    @property
    def run(self) -> Any:  # pragma: no cover - not used
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(
            content=content,
            dst_node_id=dst_node_id,
            message_type=message_type,
            group_id=group_id,
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            mid = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = mid
            if self.keep_history:
                self.sent.append(message)
            ctx = self.contexts[message.metadata.dst_node_id]
            delivered = (
                message if self.tamper_request is None else self.tamper_request(message)
            )
            try:
                reply = self.app(delivered, ctx)
            except Exception as exc:  # Flower turns ClientApp exceptions into errors
                reply = Message(
                    Error(code=0, reason=f"{type(exc).__name__}: {exc}"),
                    reply_to=message,
                )
            if self.tamper is not None:
                reply = self.tamper(message, reply)
            if reply is not None:
                if self.keep_history:
                    self.received.append(reply)
                self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        return self.pull_messages(self.push_messages(messages))
