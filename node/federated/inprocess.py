"""An in-process grid: the coordinator's workflows talk to ClientApps called directly.

Flower's simulation engine needs Ray; this grid runs the real ServerApp workflow (SecAgg+
protocol, DP wrapper, FedAvg) against real ClientApps (with their mods) in one process, each
node with a :class:`~flwr.app.Context` of its own that persists across messages as on a
SuperNode. Used by the tests and the benchmark; a deployment uses SuperLink and SuperNodes.

*observe*, when given, sees every reply before the coordinator does (tests use it to check
what leaves a node).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from uuid import uuid4

from node.federated.env import quiet_flower

quiet_flower()

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.client import ClientApp  # noqa: E402
from flwr.serverapp.grid import Grid  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

SUPERLINK_NODE_ID = 1


class InProcessGrid(Grid):
    """A grid whose nodes are ``(ClientApp, node_config)`` pairs in this process."""

    def __init__(
        self,
        nodes: dict[int, tuple[ClientApp, dict[str, str | int | float | bool]]],
        run_config: dict[str, str | int | float | bool] | None = None,
        *,
        run_id: int = 1,
        observe: Callable[[int, Message], None] | None = None,
    ) -> None:
        self._run = Run.create_empty(run_id)
        TaskIdentity.run_id = run_id
        TaskIdentity.task_id = 0
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.apps = {nid: app for nid, (app, _) in nodes.items()}
        self.contexts = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for nid, (_, cfg) in nodes.items()
        }
        self.observe = observe
        self._replies: dict[str, Message] = {}
        self.messages_sent = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            msg.metadata.__dict__["_created_at"] = time.time()
            nid = msg.metadata.dst_node_id
            # Each node gets its own copy, as over the network (mods mutate what they receive).
            delivered = Message(
                copy.deepcopy(msg.content),
                nid,
                msg.metadata.message_type,
                ttl=msg.metadata.ttl,
                group_id=msg.metadata.group_id,
            )
            for key in ("_message_id", "_run_id", "_src_node_id", "_created_at"):
                delivered.metadata.__dict__[key] = msg.metadata.__dict__[key]
            TaskIdentity.node_id = nid
            try:
                reply = self.apps[nid](message=delivered, context=self.contexts[nid])
            finally:
                TaskIdentity.node_id = SUPERLINK_NODE_ID
            reply.metadata.__dict__["_src_node_id"] = nid
            reply.metadata.__dict__["_reply_to_message_id"] = msg_id
            if self.observe is not None:
                self.observe(nid, reply)
            self._replies[msg_id] = reply
            self.messages_sent += 1
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))
