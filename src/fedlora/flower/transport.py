"""`FlowerTransport`: the round engine's exchanges as Flower messages to SuperNodes (see `fedlora.transport`).

Each new node is asked who it is (`query.setup`): with a shared dataset it names its partition, which is its
client id; with clients' own data it names itself (node config client-name, or host and data path) and the
server gives each name the next free client id, kept for the whole run (and in checkpoints), so a restarted
node gets its id back. One `train.round` message per client per round carries the shared state, the open
round's tasks and the global-phase flag; one reply comes back. A client whose node fails or has not answered
within `round-timeout` is left out of that exchange and reported in the round's `failed`; a node that the
SuperLink no longer lists loses its client until a node for that client (re)joins. Every reply is recorded
in `received.jsonl` (record names and tensor names only): the audit trail that no personal component
ever reached the server.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..client_host import LocalTask
from ..core.aggregate import ClientUpdate
from ..errors import ConfigError, UpdateRejected, UserError
from . import messages as M
from .settings import RunSettings

Say = Callable[[str], None]


class FlowerTransport:
    runtime = "flower"

    def __init__(self, grid: Grid, settings: RunSettings, num_clients: int, config_yaml: str, fingerprint: str,
                 out_dir: Path, say: Say = print):
        self.grid, self.settings, self.n = grid, settings, num_clients
        self.config_yaml, self.fingerprint, self.say = config_yaml, fingerprint, say
        self.run_id = uuid.uuid4().hex[:16]
        """This run's id on the nodes (their state directories); a resumed run keeps it (checkpoint)."""
        self.names: dict[str, int] = {}  # client name (partition or own) -> client id, for the whole run
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.spares: dict[int, int] = {}  # node id -> client id, for a second node of a client (e.g. a restart)
        self.queried: set[int] = set()
        self.received = open(out_dir / "received.jsonl", "a")  # what arrived at the server, per reply

    def close(self) -> None:
        self.received.close()

    # ------------------------------------------------------------------ the Transport interface
    def prepare(self, rnd: int) -> None:
        self._forget_offline(rnd)
        self._discover()  # a node that (re)joined since the last round

    def reachable(self) -> list[int]:
        return sorted(self.nodes)

    def round_info(self, sampled: Sequence[int]) -> dict:
        return {"nodes": {str(c): self.nodes.get(c) for c in sampled}}

    def exchange(self, req):
        cids = sorted(set(req.tasks) | set(req.train))
        targets = {c: self.nodes[c] for c in cids if c in self.nodes}
        flags = {}
        for c in targets:
            f = {"client-id": c, "train": c in req.train, "train-round": req.train_round}
            if c in req.tasks:
                t = req.tasks[c]
                f.update({"task-round": req.task_round, "local": t.train, "evaluate": t.evaluate,
                          "evaluate-global": t.evaluate_global, "base": t.base})
            flags[c] = f
        replies, failed = self._exchange(M.ROUND, req.train_round, targets, req.shared, flags)
        failed.update({c: "no node for this client" for c in cids if c not in self.nodes})
        answers, updates = {}, {}
        for cid in sorted(replies):
            try:
                metrics = replies[cid].content.metric_records[M.METRICS]
                if cid in req.train:
                    updates[cid] = _to_update(cid, replies[cid], req.shared)
                if cid in req.tasks:
                    answers[cid] = M.local_answer(metrics)
            except (UpdateRejected, KeyError, TypeError, ValueError) as e:
                bad = str(e) if isinstance(e, UpdateRejected) else f"{type(e).__name__}: {e}"
                failed[cid] = f"malformed reply ({bad})"
                updates.pop(cid, None)
                answers.pop(cid, None)
        self._log_failures(req.train_round, M.ROUND, failed, targets)
        return answers, updates, failed

    def state_dict(self) -> dict:
        """The run's id on the nodes and which client each name is (personal state lives on the nodes)."""
        return {"flower": {"run_id": self.run_id, "names": dict(self.names)}}

    def load_state_dict(self, state: Mapping) -> None:
        if "flower" in state:
            self.run_id = str(state["flower"]["run_id"])
            self.names = {str(k): int(v) for k, v in state["flower"]["names"].items()}

    def export_local(self, adapters_dir: Path, shared: Mapping) -> None:
        return None  # each node writes its own local adapter (node config export-dir)

    # ------------------------------------------------------------------ messages
    def _message(self, kind: str, node: int, rnd: int, arrays=None, **flags) -> Message:
        content = RecordDict({M.CONFIG: ConfigRecord({"config": self.config_yaml, "run-id": self.run_id,
                                                      "client-data": self.settings.client_data, **flags})})
        if arrays is not None:
            content[M.SHARED] = M.to_record(arrays)
        return Message(content, dst_node_id=node, message_type=kind, group_id=str(rnd),
                       ttl=self.settings.round_timeout)

    def _exchange(self, kind: str, rnd: int, targets: dict[int, int], arrays=None, flags=None):
        """Send one message per client (`targets`: client id -> node id) and collect the replies until all
        have arrived or `round-timeout` has passed. Returns ({cid: reply}, {cid: why it failed})."""
        flags = flags or {}
        cids = list(targets)
        msgs = [self._message(kind, targets[c], rnd, arrays, **flags.get(c, {})) for c in cids]
        ids = list(self.grid.push_messages(msgs)) if msgs else []
        ids += [None] * (len(cids) - len(ids))  # the grid returns no id for a message it could not push
        pending = {mid: c for mid, c in zip(ids, cids) if mid}
        replies, failed = {}, {c: "could not be sent" for mid, c in zip(ids, cids) if not mid}
        sent = time.monotonic()
        deadline = sent + self.settings.round_timeout
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                cid = pending.pop(reply.metadata.reply_to_message_id, None)
                if cid is None:
                    continue
                self._audit(kind, rnd, cid, reply, time.monotonic() - sent)
                if reply.has_error():
                    failed[cid] = f"error {reply.error.code}: {str(reply.error.reason).strip()[:300]}"
                else:
                    replies[cid] = reply
            if pending:
                time.sleep(0.25)
        for cid in pending.values():
            failed[cid] = f"no reply within {self.settings.round_timeout:g}s"
        return replies, failed

    def _log_failures(self, rnd: int, kind: str, failed: dict[int, str], targets: dict[int, int]) -> None:
        for cid, why in sorted(failed.items()):
            self.say(f"round {rnd}: client {cid} (node {targets.get(cid)}) failed in {kind}: {why}")

    def _audit(self, kind: str, rnd: int, cid, reply: Message, seconds: float) -> None:
        """Record what arrived: record names, the parameter names of every ArrayRecord, metric names."""
        entry = {"round": rnd, "phase": kind, "client": cid, "node": reply.metadata.src_node_id,
                 "seconds": round(seconds, 2), "error": reply.has_error()}
        if reply.has_content():
            c = reply.content
            entry["arrays"] = {name: _names(rec) for name, rec in c.array_records.items()}
            entry["metrics"] = {name: sorted(rec.keys()) for name, rec in c.metric_records.items()}
            if M.METRICS in c.metric_records and "seconds" in c.metric_records[M.METRICS]:
                entry["client_seconds"] = round(float(c.metric_records[M.METRICS]["seconds"]), 2)
            entry["configs"] = {name: sorted(rec.keys()) for name, rec in c.config_records.items()}
        self.received.write(json.dumps(entry) + "\n")
        self.received.flush()

    # ------------------------------------------------------------------ nodes
    def _discover(self) -> None:
        """Ask nodes not seen before which client they are (they check their config and data on the way)."""
        new = [n for n in self.grid.get_node_ids() if n not in self.queried]
        if not new:
            return
        self.queried.update(new)
        fp = {"fingerprint": self.fingerprint}
        replies, failed = self._exchange(M.SETUP, 0, {n: n for n in new}, flags={n: fp for n in new})
        for node, why in failed.items():
            self.say(f"node {node} cannot take part: {why}")
        infos = {}
        for node, reply in replies.items():
            try:
                info = reply.content.config_records[M.INFO]
                infos[node] = (str(info["client"]), info)
            except (KeyError, TypeError, ValueError) as e:
                self.say(f"node {node} cannot take part: malformed setup reply ({e})")
        for node, (name, info) in sorted(infos.items(), key=lambda kv: kv[1][0]):  # new names get ids in name order
            cid = self._client_id(node, name, info)
            if cid is None:
                continue
            if cid in self.nodes:
                self.say(f"node {node} says it is client {cid} ({name}), which node {self.nodes[cid]} already is; "
                         f"kept as a spare for client {cid}")
                self.spares[node] = cid
                continue
            self.nodes[cid] = node
            self.say(f"client {cid}: node {node}, {name} ({info['train-rows']} training rows, "
                     f"{info['test-rows']} test rows)")

    def _client_id(self, node: int, name: str, info) -> int | None:
        """The client id of a name: its partition, the id it had before in this run, or the next free one."""
        if self.settings.client_data == "partition":
            cid = int(info["partition-id"])
            if not 0 <= cid < self.n:
                self.say(f"node {node} cannot take part: partition-id {cid} out of range")
                return None
        elif name in self.names:
            cid = self.names[name]
        else:
            free = sorted(set(range(self.n)) - set(self.names.values()))
            if not free:
                self.say(f"node {node} ({name}) cannot take part: the run's {self.n} clients "
                         f"(federation.clients) all have a name already")
                return None
            cid = free[0]
        self.names[name] = cid
        return cid

    def _forget_offline(self, rnd: int) -> None:
        """Clients whose node the SuperLink no longer lists (missed heartbeats) have no node until one joins."""
        online = set(self.grid.get_node_ids())
        for cid, node in sorted(self.nodes.items()):
            if node not in online:
                self.say(f"round {rnd}: client {cid} (node {node}) is offline")
                del self.nodes[cid]
        for node, cid in sorted(self.spares.items()):
            if node not in online:
                del self.spares[node]
            elif cid not in self.nodes:
                self.say(f"round {rnd}: client {cid} is now node {node}")
                self.nodes[cid] = self.spares.pop(node)

    def connect(self) -> None:
        """Wait until `min-nodes` (default: every client) have a node."""
        need = self.settings.min_nodes or self.n
        if need > self.n:
            raise ConfigError(f"run config 'min-nodes': {need} is more than federation.clients={self.n}")
        deadline = time.monotonic() + self.settings.node_wait_timeout
        self.say(f"waiting for {need} of {self.n} client nodes")
        while True:
            if len(list(self.grid.get_node_ids())) >= need or time.monotonic() > deadline:
                self._discover()  # all at once: new clients get their ids in the order of their names
            if len(self.nodes) >= need:
                return
            if time.monotonic() > deadline:
                raise UserError(f"only {len(self.nodes)} of the {need} client nodes needed are ready after "
                                f"{self.settings.node_wait_timeout:g}s (clients {sorted(self.nodes)}); start more "
                                f"flower-supernode processes, fix the failing ones, or lower run config min-nodes")
            time.sleep(1.0)


def _names(record) -> list[str] | str:
    """The tensor names of a record, sorted; a malformed one is recorded as such (and fails in `exchange`)."""
    try:
        return sorted(M.names(record))
    except UpdateRejected as e:
        return str(e)


def _to_update(cid: int, reply: Message, like) -> ClientUpdate:
    c = reply.content
    mr = c.metric_records[M.METRICS]
    state = M.from_record(c.array_records[M.UPDATE], like) if M.UPDATE in c.array_records else {}
    return ClientUpdate(cid, state, int(mr["num-examples"]),
                        {"train_loss": float(mr["train-loss"]), "steps": int(mr["steps"]),
                         "diverged": bool(mr["diverged"]),
                         **({"tokens": int(mr["tokens"])} if "tokens" in mr else {})})
