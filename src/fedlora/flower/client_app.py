"""The Flower ClientApp: a thin shell over `ClientHost` (see fedlora.flower.messages for the protocol).

A node is the client `partition-id` of the config the server sends; it builds the same federated
data as the simulator and keeps that client's rows only (`workspace.client_host`). Its personal
components (e.g. B.mag of fedlora_opt) are kept in `Context.state` (`personal.ContextPersonalStore`),
persist across rounds on the node, and are never put in a reply: a global-phase reply holds only the
method's shared components.

With a node config export-dir, the node also writes its personal state after every round
(export-dir/personal/round_<r>.pt, with export-dir/run.json naming the run's config). When the
server resumes a run from a checkpoint of round R, a node that holds no personal state for this run
reloads the newest of its own files up to round R, so personal state survives a restart of the
ServerApp (and of the node) without ever leaving the node.
"""

from __future__ import annotations

import hashlib
import json
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import messages as M
from .settings import NodeSettings

app = ClientApp()


def _setup(msg: Message, context: Context):
    """Node settings, this machine's config, and this node's client (cached per process) with its personal store."""
    from ..personal import ContextPersonalStore
    from .workspace import client_host

    node = NodeSettings.from_node_config(context.node_config)
    cfg = node.config(str(msg.content[M.CONFIG]["config"]))
    host = client_host(cfg, node.partition_id)
    host.store = ContextPersonalStore(context)
    _restore_if_resumed(host, node, msg)
    return node, cfg, host


def _shared(msg: Message, host, cfg) -> dict:
    """The server's shared state from the message, as the tensors (dtype, device) the wire format promises."""
    from ..core.components import cast_floats, select, transfer_dtype

    like = cast_floats(select(host.am.init_state, host.method.shared), transfer_dtype(cfg.federation.transfer_dtype))
    return M.from_record(msg.content[M.SHARED], like)


def _config_id(cfg_yaml: str) -> str:
    return hashlib.sha256(cfg_yaml.encode()).hexdigest()[:16]


def _restore_if_resumed(host, node: NodeSettings, msg: Message) -> None:
    """After a resumed server, a node that holds no personal state for this run reloads it from its export-dir."""
    cid = node.partition_id
    conf = msg.content[M.CONFIG]
    resumed = int(conf["resume-round"]) if "resume-round" in conf else 0
    if resumed <= 0 or host.store.get(cid) is not None:
        return
    restored = _restore_personal(node, resumed, _config_id(str(conf["config"])))
    if restored:
        host.store.put(cid, restored)


def _saved_config_id(export_dir) -> str | None:
    try:
        return json.loads((export_dir / "run.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None


def _restore_personal(node: NodeSettings, resumed: int, config_id: str):
    """The newest personal/round_<r>.pt with r <= resumed in export-dir, if it belongs to this run's config."""
    import torch

    where = f"client {node.partition_id}: the run resumed after round {resumed}"
    d = node.export_dir
    if d is None:
        print(f"{where}, but this node has no export-dir; its personal state starts from the initial value")
        return None
    if _saved_config_id(d) != config_id:
        print(f"{where}, but {d} holds no personal state of this run's config; it starts from the initial value")
        return None
    rounds = sorted((int(p.stem.split("_")[1]), p) for p in (d / "personal").glob("round_*.pt")
                    if p.stem.split("_")[1].isdigit() and int(p.stem.split("_")[1]) <= resumed)
    if not rounds:
        return None  # never trained up to that round: the initial value is the right one
    r, path = rounds[-1]
    print(f"{where}; personal state reloaded from {path} (round {r})")
    return torch.load(path, map_location="cpu", weights_only=True)


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Which client this node is; checks its config and that its data is the server's. Loads no model."""
    from ..data.federated import build_federated_data, load_examples
    from ..errors import DataError

    node = NodeSettings.from_node_config(context.node_config)
    cfg = node.config(str(msg.content[M.CONFIG]["config"]))
    data = build_federated_data(cfg, *load_examples(cfg, warn=print))
    expected = str(msg.content[M.CONFIG]["fingerprint"])
    if data.fingerprint != expected:
        raise DataError(f"node {node.partition_id}: its data ({cfg.data.path}, fingerprint {data.fingerprint}) "
                        f"differs from the server's (fingerprint {expected}); every node must read the same "
                        f"rows to get its partition; set node config data-path")
    cd = data.clients[node.partition_id]
    return Message(RecordDict({M.INFO: ConfigRecord({
        "partition-id": node.partition_id, "num-partitions": cfg.federation.clients,
        "train-rows": len(cd.train), "test-rows": len(cd.test), "fingerprint": data.fingerprint,
    })}), reply_to=msg)


@app.train("global")
def train_global(msg: Message, context: Context) -> Message:
    """The global phase; the reply carries the shared components and nothing personal."""
    t0 = time.perf_counter()
    node, cfg, host = _setup(msg, context)
    cid = node.partition_id
    rnd = int(msg.content[M.CONFIG]["round"])
    shared = _shared(msg, host, cfg)
    u = host.global_phases(rnd, [cid], shared)[cid]
    metrics = MetricRecord({"partition-id": cid, "num-examples": u.num_examples,
                            "train-loss": float(u.metrics["train_loss"]), "steps": int(u.metrics["steps"]),
                            "diverged": int(bool(u.metrics["diverged"])), "seconds": time.perf_counter() - t0})
    return Message(RecordDict({M.UPDATE: M.to_record(u.state), M.METRICS: metrics}), reply_to=msg)


@app.train("local")
def train_local(msg: Message, context: Context) -> Message:
    """After aggregation: the local phase on the new global adapter, then (if asked) local evaluation;
    in round 0, the base model's evaluation (the reference row)."""
    from ..client_host import LocalTask

    t0 = time.perf_counter()
    node, cfg, host = _setup(msg, context)
    cid = node.partition_id
    conf = msg.content[M.CONFIG]
    rnd = int(conf["round"])
    task = LocalTask(train=bool(conf["local"]), evaluate=bool(conf["evaluate"]),
                     base=bool(conf["base"]) if "base" in conf else False)
    shared = _shared(msg, host, cfg) if M.SHARED in msg.content.array_records else None
    out = {"partition-id": cid, **M.local_metrics(host.local_round(rnd, {cid: task}, shared)[cid])}
    if node.export_dir is not None and shared is not None:
        _export(node, host, rnd, cfg.federation.rounds, shared, _config_id(str(conf["config"])))
    out["seconds"] = time.perf_counter() - t0
    return Message(RecordDict({M.METRICS: MetricRecord(out)}), reply_to=msg)


def _export(node: NodeSettings, host, rnd: int, rounds: int, shared, config_id: str) -> None:
    """export-dir/personal/round_<r>.pt each round (the personal state); export-dir/adapter (PEFT) at the end."""
    import torch

    from ..results import atomic_write

    d, cid = node.export_dir, node.partition_id
    d.mkdir(parents=True, exist_ok=True)
    if _saved_config_id(d) != config_id:
        atomic_write(d / "run.json", json.dumps({"config": config_id, "partition-id": cid}) + "\n")
    personal = host.store.get(cid)
    if personal:
        (d / "personal").mkdir(exist_ok=True)
        tmp = d / "personal" / f".round_{rnd}.pt.tmp"
        torch.save({k: v.detach().cpu() for k, v in personal.items()}, tmp)
        tmp.replace(d / "personal" / f"round_{rnd}.pt")  # never a torn file under the final name
    if rnd == rounds:
        host.am.export_peft(host.local_state(cid, shared), d / "adapter")
        (d / "client.json").write_text(json.dumps({"partition-id": cid, "round": rnd,
                                                   "method": host.method.name}) + "\n")
