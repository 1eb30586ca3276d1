"""The Flower ClientApp: a thin shell over `FedClient` (see fedlora.flower.messages for the protocol).

A node is the client `partition-id` of the config the server sends; it builds the same federated
data as the simulator and trains on that client's rows. Its personal components (e.g. B.mag of
fedlora_opt) are kept in `Context.state`, persist across rounds on the node, and are never put in
a reply: a global-phase reply holds only the method's shared components.
"""

from __future__ import annotations

import json
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import messages as M
from .settings import NodeSettings

app = ClientApp()


def _setup(msg: Message, context: Context):
    """Node settings, this machine's config and the (cached) workspace for this message."""
    from .workspace import client_workspace

    node = NodeSettings.from_node_config(context.node_config)
    cfg = node.config(str(msg.content[M.CONFIG]["config"]))
    return node, cfg, client_workspace(cfg)


def _personal(context: Context):
    rec = context.state.array_records.get(M.PERSONAL)
    return dict(rec.to_torch_state_dict()) if rec is not None else None


def _keep_personal(context: Context, personal) -> None:
    if personal:
        context.state[M.PERSONAL] = ArrayRecord({k: v.detach().cpu() for k, v in personal.items()})


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
    node, cfg, ws = _setup(msg, context)
    sim, cid = ws.sim, node.partition_id
    rnd = int(msg.content[M.CONFIG]["round"])
    shared = M.from_record(msg.content[M.SHARED], sim.am.init_state)
    rows = sim.train_rows[cid]
    res = sim.client.global_phase(cid, rnd, shared, _personal(context), rows,
                                  steps=sim.client.steps_for(len(rows)))
    _keep_personal(context, res.personal)
    u = res.update
    leaked = set(u.state) - set(shared)
    if leaked:  # the policy uploads shared components only; never let anything else out
        raise RuntimeError(f"refusing to send non-shared parameters to the server: {sorted(leaked)[:3]}")
    metrics = MetricRecord({"partition-id": cid, "num-examples": u.num_examples,
                            "train-loss": float(u.metrics["train_loss"]), "steps": int(u.metrics["steps"]),
                            "diverged": int(bool(u.metrics["diverged"])), "seconds": time.perf_counter() - t0})
    return Message(RecordDict({M.UPDATE: M.to_record(u.state), M.METRICS: metrics}), reply_to=msg)


@app.train("local")
def train_local(msg: Message, context: Context) -> Message:
    """After aggregation: the local phase on the new global adapter, then (if asked) local evaluation."""
    from ..core import protocol
    from ..evaluate import evaluate

    t0 = time.perf_counter()
    node, cfg, ws = _setup(msg, context)
    sim, cid = ws.sim, node.partition_id
    conf = msg.content[M.CONFIG]
    rnd = int(conf["round"])
    shared = M.from_record(msg.content[M.SHARED], sim.am.init_state)
    personal = _personal(context)
    out: dict = {"partition-id": cid}
    if bool(conf["local"]) and sim.method.has_local_phase:
        personal, stats = sim.client.local_phase(cid, rnd, shared, personal, sim.train_rows[cid])
        _keep_personal(context, personal)
        out.update({"local-loss": stats.loss, "local-steps": stats.steps})
    local_state = protocol.local_model_state(sim.method, sim.client.full_global_state(shared), personal)
    if bool(conf["evaluate"]):
        sim.am.load_state(local_state)
        rows = sim.evaluator._split(ws.data.clients[cid])  # the client's test (or validation) split
        r = evaluate(sim.am, sim.fmt, rows, cfg.eval, cfg.eval.max_examples_per_client)
        out.update({"eval-loss": r.loss, "eval-examples": r.examples, "eval-tokens": r.tokens})
        if r.rouge_l is not None:
            out["eval-rouge-l"] = r.rouge_l
    if node.export_dir is not None:
        _export(node, sim, rnd, cfg.federation.rounds, personal, local_state)
    out["seconds"] = time.perf_counter() - t0
    return Message(RecordDict({M.METRICS: MetricRecord(out)}), reply_to=msg)


def _export(node: NodeSettings, sim, rnd: int, rounds: int, personal, local_state) -> None:
    """export-dir/personal/round_<r>.pt each round (the personal state); export-dir/adapter (PEFT) at the end."""
    import torch

    d = node.export_dir
    d.mkdir(parents=True, exist_ok=True)
    if personal:
        (d / "personal").mkdir(exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in personal.items()}, d / "personal" / f"round_{rnd}.pt")
    if rnd == rounds:
        sim.am.export_peft(local_state, d / "adapter")
        (d / "client.json").write_text(json.dumps({"partition-id": node.partition_id, "round": rnd,
                                                   "method": sim.method.name}) + "\n")
