"""`FlowerTransport`: the round engine's requests as Flower messages to SuperNodes (see `fedlora.transport`).

A node serves the client given by its node config (`partition-id`); the transport learns the
client -> node map by a `query.setup` message to each new node. A client whose node fails or has not
answered within `round-timeout` is left out of that request and reported in the round's `failed`; a
node that the SuperLink no longer lists loses its client until a node for that client (re)joins.
Every reply is recorded in `received.jsonl` (record names and parameter names only): the audit trail
that no personal component ever reached the server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..client_host import LocalTask
from ..core.aggregate import ClientUpdate
from ..errors import ConfigError, UserError
from . import messages as M
from .settings import RunSettings

Say = Callable[[str], None]


class FlowerTransport:
    runtime = "flower"

    def __init__(self, grid: Grid, settings: RunSettings, num_clients: int, config_yaml: str, fingerprint: str,
                 out_dir: Path, resume_round: int = 0, say: Say = print):
        self.grid, self.settings, self.n = grid, settings, num_clients
        self.config_yaml, self.fingerprint, self.resume_round, self.say = config_yaml, fingerprint, resume_round, say
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

    def global_phase(self, rnd, cids, shared):
        targets = {c: self.nodes[c] for c in cids if c in self.nodes}
        replies, failed = self._exchange(M.GLOBAL, rnd, targets, shared)
        failed.update({c: "no node for this client" for c in cids if c not in self.nodes})
        updates = {}
        for cid in sorted(replies):
            try:
                updates[cid] = _to_update(cid, replies[cid], shared)
            except (KeyError, TypeError, ValueError) as e:
                failed[cid] = f"malformed reply ({type(e).__name__}: {e})"
        self._log_failures(rnd, M.GLOBAL, failed, targets)
        return updates, failed

    def local_round(self, rnd, tasks: Mapping[int, LocalTask], shared):
        targets = {c: self.nodes[c] for c in sorted(tasks) if c in self.nodes}
        flags = {c: {"local": tasks[c].train, "evaluate": tasks[c].evaluate, "base": tasks[c].base} for c in targets}
        replies, failed = self._exchange(M.LOCAL, rnd, targets, shared, flags)
        failed.update({c: "no node for this client" for c in tasks if c not in self.nodes})
        self._log_failures(rnd, M.LOCAL, failed, targets)
        return {c: M.local_answer(r.content.metric_records.get(M.METRICS, {})) for c, r in replies.items()}, failed

    def state_dict(self) -> dict:
        return {}  # personal state lives on the nodes

    def load_state_dict(self, state: Mapping) -> None:
        return None

    def export_local(self, adapters_dir: Path, shared: Mapping) -> None:
        return None  # each node writes its own local adapter (node config export-dir)

    # ------------------------------------------------------------------ messages
    def _message(self, kind: str, node: int, rnd: int, arrays=None, **flags) -> Message:
        content = RecordDict({M.CONFIG: ConfigRecord({"config": self.config_yaml, "round": rnd,
                                                      "resume-round": self.resume_round, **flags})})
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
            entry["arrays"] = {name: sorted(rec.keys()) for name, rec in c.array_records.items()}
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
        for node, reply in replies.items():
            try:
                info = reply.content.config_records[M.INFO]
                cid = int(info["partition-id"])
                if not 0 <= cid < self.n:
                    raise ValueError(f"partition-id {cid} out of range")
            except (KeyError, TypeError, ValueError) as e:
                self.say(f"node {node} cannot take part: malformed setup reply ({e})")
                continue
            if cid in self.nodes:
                self.say(f"node {node} says it is client {cid}, which node {self.nodes[cid]} already is; "
                         f"kept as a spare for client {cid}")
                self.spares[node] = cid
                continue
            self.nodes[cid] = node
            self.say(f"client {cid}: node {node} ({info['train-rows']} training rows, {info['test-rows']} test rows)")

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
            self._discover()
            if len(self.nodes) >= need:
                return
            if time.monotonic() > deadline:
                raise UserError(f"only {len(self.nodes)} of the {need} client nodes needed are ready after "
                                f"{self.settings.node_wait_timeout:g}s (clients {sorted(self.nodes)}); start more "
                                f"flower-supernode processes, fix the failing ones, or lower run config min-nodes")
            time.sleep(1.0)


def _to_update(cid: int, reply: Message, like) -> ClientUpdate:
    c = reply.content
    mr = c.metric_records[M.METRICS]
    state = M.from_record(c.array_records[M.UPDATE], like) if M.UPDATE in c.array_records else {}
    return ClientUpdate(cid, state, int(mr["num-examples"]),
                        {"train_loss": float(mr["train-loss"]), "steps": int(mr["steps"]),
                         "diverged": bool(mr["diverged"])})
