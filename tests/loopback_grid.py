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
        ids = []
        for msg in messages:
            proto = serde.message_to_proto(msg)
            proto.metadata.message_id = f"m{next(self._ids)}"
            delivered = serde.message_from_proto(proto)
            self.sent.append(delivered)
            node = delivered.metadata.dst_node_id
            try:
                reply = self.client_app(delivered, self.contexts[node])
            except Exception as e:  # a ClientApp that raises answers with an error reply, as under Flower
                reply = _error_reply(delivered, e)
            reply = serde.message_from_proto(serde.message_to_proto(reply))
            self.received.append(reply)
            self.replies[delivered.metadata.message_id] = reply
            ids.append(delivered.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def _error_reply(msg: Message, e: Exception) -> Message:
    from flwr.app import Error

    return Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
