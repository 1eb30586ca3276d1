"""The Flower ClientApp: a thin shell over `ClientHost` (see fedlora.flower.messages for the protocol).

A node is one client. Either it reads the same dataset as the server and is its partition `partition-id`
(research runs; the simulator's partitions), or it brings its own data (node config `data-path`, no
`partition-id`): it carves its own seeded test split, trains on the rest and tells the server only counts;
the server gives it a client id for the whole run (`workspace.client_host` builds the node's model and rows).

One `train.round` message per round: the node first finishes the open round on the server's new shared
state (its local phase and evaluations), then runs the next round's global phase from it, and replies once.

Its personal components (e.g. B.mag of fedlora_opt) are kept durable in the node's state directory
(`personal.DiskPersonalStore`, one directory per run and client), persist across rounds and across a restart
of the node, and are never put in a reply: a reply holds only the method's shared components (trained from
the server's state) and metrics. With node config export-dir the node writes its personalized adapter there
after the last round.
"""

from __future__ import annotations

import json
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import messages as M
from .settings import NodeSettings

app = ClientApp()


def _shared(msg: Message, host, cfg) -> dict:
    """The server's shared state from the message, as the tensors (dtype, device) the wire format promises."""
    from ..core.components import cast_floats, select, transfer_dtype

    like = cast_floats(select(host.am.init_state, host.method.shared), transfer_dtype(cfg.federation.transfer_dtype))
    return M.from_record(msg.content[M.SHARED], like)


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Which client this node is (its partition, or its own name and data); loads no model."""
    from ..errors import ConfigError, DataError
    from .workspace import node_data

    node = NodeSettings.from_node_config(context.node_config)
    conf = msg.content[M.CONFIG]
    cfg = node.config(str(conf["config"]))
    mode = str(conf["client-data"]) if "client-data" in conf else "partition"
    if (mode == "own") != node.own_data:
        want = ("clients with their own data (node config data-path, no partition-id)" if mode == "own"
                else "partitions of the shared dataset (node config partition-id)")
        raise ConfigError(f"node {node.key}: the run expects {want}; this node is configured for the other mode")
    data, fingerprint = node_data(cfg, node)
    if not node.own_data and fingerprint != str(conf["fingerprint"]):
        raise DataError(f"node {node.partition_id}: its data ({cfg.data.path}, fingerprint {fingerprint}) "
                        f"differs from the server's (fingerprint {conf['fingerprint']}); every node must read "
                        f"the same rows to get its partition; set node config data-path")
    info = {"client": node.key, "train-rows": len(data.train), "test-rows": len(data.test),
            "validation-rows": len(data.validation), "fingerprint": fingerprint}
    if node.partition_id is not None:
        info.update({"partition-id": node.partition_id, "num-partitions": cfg.federation.clients})
    return Message(RecordDict({M.INFO: ConfigRecord(info)}), reply_to=msg)


@app.train("round")
def train_round(msg: Message, context: Context) -> Message:
    """The open round's tasks for this client (local phase, evaluations), then the next round's global phase;
    the reply carries the shared components it trained and metrics, nothing personal."""
    from ..client_host import LocalTask
    from ..personal import DiskPersonalStore
    from .workspace import client_host

    t0 = time.perf_counter()
    node = NodeSettings.from_node_config(context.node_config)
    conf = msg.content[M.CONFIG]
    cfg = node.config(str(conf["config"]))
    cid = int(conf["client-id"])
    host = client_host(cfg, cid, node)
    host.store = DiskPersonalStore(node.state_dir / str(conf["run-id"]) / node.key, cid,
                                   keep=cfg.output.checkpoint_every + 2)
    shared = _shared(msg, host, cfg) if M.SHARED in msg.content.array_records else None
    out: dict = {"client-id": cid}
    content = RecordDict()
    if "task-round" in conf:
        rnd = int(conf["task-round"])
        task = LocalTask(train=bool(conf["local"]), evaluate=bool(conf["evaluate"]),
                         evaluate_global=bool(conf["evaluate-global"]), base=bool(conf["base"]))
        out.update(M.local_metrics(host.local_round(rnd, {cid: task}, shared)[cid]))
        if node.export_dir is not None and rnd == cfg.federation.rounds and not task.base:
            _export(node, host, cid, rnd, shared)
    if bool(conf["train"]):
        u = host.global_phases(int(conf["train-round"]), [cid], shared)[cid]
        out.update({"num-examples": u.num_examples, "train-loss": float(u.metrics["train_loss"]),
                    "steps": int(u.metrics["steps"]), "tokens": int(u.metrics["tokens"]),
                    "diverged": int(bool(u.metrics["diverged"]))})
        content[M.UPDATE] = M.to_record(u.state)
    out["seconds"] = time.perf_counter() - t0
    content[M.METRICS] = MetricRecord(out)
    return Message(content, reply_to=msg)


def _export(node: NodeSettings, host, cid: int, rnd: int, shared) -> None:
    """export-dir/adapter: the client's personalized model after the last round, as a PEFT adapter."""
    d = node.export_dir
    host.am.export_peft(host.local_state(cid, shared), d / "adapter")
    (d / "client.json").write_text(json.dumps({"client": node.key, "client-id": cid, "round": rnd,
                                               "method": host.method.name}) + "\n")
