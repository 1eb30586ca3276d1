"""A Flower `Grid` whose nodes are the project's real ClientApp, called in this process.

Every message and every reply goes through Flower's own protobuf wire format (`message_to_proto` /
`message_from_proto`), and each node has its own `Context` (node config, state), as under a SuperLink.
What it leaves out is only the network and the processes: the real SuperLink/SuperNode deployment and
Flower's simulation engine are tested in test_flower.py. It makes the Flower runtime cheap enough to
compare with the in-process one for every method.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import flwr.common.serde as serde
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1
SERVER_NODE = 1


class LoopbackGrid(Grid):
    def __init__(self, client_app, node_configs: dict[int, dict]):
        self.client_app = client_app
        self.contexts = {nid: Context(run_id=RUN_ID, node_id=nid, node_config=dict(cfg), state=RecordDict(),
                                      run_config={}) for nid, cfg in node_configs.items()}
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self._ids = itertools.count(1)
        self._run = None
        self.before_push = None
        """Called with each batch of messages before delivery: a test's faults (e.g. the server dies)."""
        self.after_push = None
        """Called with each batch of messages after their replies: a test's faults (a node leaves, joins)."""

    # ------------------------------------------------------------------ a federation's changes
    def add_node(self, node_id: int, node_config: dict) -> None:
        """A SuperNode (re)starts: a new node id, a fresh Context (its files on disk are all it keeps)."""
        self.contexts[node_id] = Context(run_id=RUN_ID, node_id=node_id, node_config=dict(node_config),
                                         state=RecordDict(), run_config={})

    def remove_node(self, node_id: int) -> dict:
        """A SuperNode is killed: the SuperLink stops listing it. Returns its node config."""
        return dict(self.contexts.pop(node_id).node_config)

    def __enter__(self) -> LoopbackGrid:
        self._saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SERVER_NODE
        return self

    def __exit__(self, *exc) -> None:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = self._saved

    # ------------------------------------------------------------------ Grid
    @property
    def run(self):
        return self._run

    def set_run(self, run) -> None:
        self._run = run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if self.before_push is not None:
            self.before_push(self, messages)
        ids = []
        for msg in messages:
            proto = serde.message_to_proto(msg)
            proto.metadata.message_id = f"m{next(self._ids)}"
            delivered = serde.message_from_proto(proto)
            self.sent.append(delivered)
            node = delivered.metadata.dst_node_id
            if node not in self.contexts:  # gone: the message is never answered
                ids.append(delivered.metadata.message_id)
                continue
            try:
                reply = self.client_app(delivered, self.contexts[node])
            except Exception as e:  # a ClientApp that raises answers with an error reply, as under Flower
                reply = _error_reply(delivered, e)
            reply = serde.message_from_proto(serde.message_to_proto(reply))
            self.received.append(reply)
            self.replies[delivered.metadata.message_id] = reply
            ids.append(delivered.metadata.message_id)
        if self.after_push is not None:
            self.after_push(self, messages)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def _error_reply(msg: Message, e: Exception) -> Message:
    from flwr.app import Error

    return Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
