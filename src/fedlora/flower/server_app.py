"""The Flower ServerApp: the simulator's round (`Simulation.run_round`) with Flower carrying the messages.

Per round, in the simulator's order:
  1. sample clients (`sample_clients`, same seed -> same clients),
  2. send them the shared state; each runs `FedClient.global_phase` on its node,
  3. `Server.aggregate` over the replies that arrived (sorted by client id, as in the simulator),
  4. send the new shared state; sampled clients run `FedClient.local_phase` on their node,
     and at evaluation rounds every client evaluates its local model on its own test split,
  5. the server evaluates the global model on the global test set and appends to metrics.jsonl.

A client that fails or has not answered within `round-timeout` is left out of that round (logged
in the round's `failed`); the round aggregates what arrived if at least `min-replies` did.

Every `output.checkpoint_every` rounds the server writes a checkpoint of what it holds (global state,
server optimizer state, metrics so far, config, data fingerprint; `fedlora.checkpoint`). Run config
`resume=true` continues from the last complete one. Client sampling and every client phase are seeded
by (seed, round[, client, phase]), so there is no sampler state to save. Personal components live on the
nodes: every message says from which round the run resumed, and a node that holds no personal state
for this run reloads its own copy from its export-dir (see client_app); without an export-dir it
starts that client's personal state from its initial value, and says so.

Evaluation differs from the simulator in one point, by design: the server never sees personal
components, so the global model it evaluates is the shared components plus the *initial* value
of the personal ones (the simulator uses the clients' mean). For methods without personal
components (fedit, fedprox, ffa, feddora) the two are the same model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from .. import results as res
from ..checkpoint import Checkpoint, CheckpointError, CheckpointStore, check_resume, is_due, open_for_resume
from ..config import Config, dump_config
from ..core import protocol
from ..core.aggregate import ClientUpdate
from ..core.components import nbytes
from ..core.methods import build_method
from ..errors import ConfigError, UserError
from ..runner import round_line
from ..simulation import RoundRecord, sample_clients
from . import messages as M
from .settings import RunSettings
from .workspace import build_workspace

GLOBAL_NOTE_PERSONAL = ("shared components + the initial value of the personal components: under Flower the server "
                        "never sees the clients' personal components (the in-process simulator uses their mean)")


def say(line: str) -> None:
    print(line, flush=True)


class FlowerRun:
    """One experiment on a Flower grid. Holds the server's workspace and the client -> node map."""

    def __init__(self, grid: Grid, cfg: Config, settings: RunSettings, out_dir: Path,
                 resume: Checkpoint | None = None):
        if build_method(cfg.method, cfg.method_options, rank=cfg.lora.r).pooled:
            raise ConfigError("method: 'centralized' pools all data in one place and has no federated deployment; "
                              "run it with `fedlora run`")
        self.grid, self.cfg, self.settings, self.out = grid, cfg, settings, out_dir
        self.ws = build_workspace(cfg)
        self.sim = self.ws.sim
        self.method, self.server = self.sim.method, self.sim.server
        self.n = cfg.federation.clients
        self.nodes: dict[int, int] = {}  # client id (partition-id) -> node id
        self.queried: set[int] = set()
        self.spares: dict[int, int] = {}  # node id -> client id, for a second node of a client (e.g. a restart)
        self.config_yaml = dump_config(cfg)
        self.store = CheckpointStore(out_dir)
        self.resume = resume
        self.resume_round = resume.round if resume else 0
        if resume is not None:
            self._restore(resume)
        self.received = open(out_dir / "received.jsonl", "a")  # what arrived at the server, per reply

    def _restore(self, ckpt: Checkpoint) -> None:
        """The server's state from a checkpoint of this run directory; refuses one that does not fit."""
        if ckpt.state.get("runtime") != "flower":
            raise CheckpointError(f"run config resume: {ckpt.path} was written by `fedlora run` (the in-process "
                                  f"simulator); resume it with `fedlora run --resume {self.out}`")
        fp = self.ws.data.fingerprint
        if fp != ckpt.fingerprint and not self.settings.force:
            raise CheckpointError(f"run config resume: the data differ from the run's (fingerprint "
                                  f"{ckpt.fingerprint}, now {fp}, data.path={self.cfg.data.path}); set force=true "
                                  f"to continue anyway")
        try:
            self.server.load_state_dict(ckpt.state["server"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"run config resume: checkpoint {ckpt.path.name} does not fit this config: "
                                  f"{e}") from None

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
            say(f"round {rnd}: client {cid} (node {targets.get(cid)}) failed in {kind}: {why}")

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
        fp = {"fingerprint": self.ws.data.fingerprint}
        replies, failed = self._exchange(M.SETUP, 0, {n: n for n in new}, flags={n: fp for n in new})
        for node, why in failed.items():
            say(f"node {node} cannot take part: {why}")
        for node, reply in replies.items():
            try:
                info = reply.content.config_records[M.INFO]
                cid = int(info["partition-id"])
                if not 0 <= cid < self.n:
                    raise ValueError(f"partition-id {cid} out of range")
            except (KeyError, TypeError, ValueError) as e:
                say(f"node {node} cannot take part: malformed setup reply ({e})")
                continue
            if cid in self.nodes:
                say(f"node {node} says it is client {cid}, which node {self.nodes[cid]} already is; "
                    f"kept as a spare for client {cid}")
                self.spares[node] = cid
                continue
            self.nodes[cid] = node
            say(f"client {cid}: node {node} ({info['train-rows']} training rows, {info['test-rows']} test rows)")

    def _forget_offline(self, rnd: int) -> None:
        """Clients whose node the SuperLink no longer lists (missed heartbeats) have no node until one joins."""
        online = set(self.grid.get_node_ids())
        for cid, node in sorted(self.nodes.items()):
            if node not in online:
                say(f"round {rnd}: client {cid} (node {node}) is offline")
                del self.nodes[cid]
        for node, cid in sorted(self.spares.items()):
            if node not in online:
                del self.spares[node]
            elif cid not in self.nodes:
                say(f"round {rnd}: client {cid} is now node {node}")
                self.nodes[cid] = self.spares.pop(node)

    def connect(self) -> None:
        need = self.settings.min_nodes or self.n
        if need > self.n:
            raise ConfigError(f"run config 'min-nodes': {need} is more than federation.clients={self.n}")
        deadline = time.monotonic() + self.settings.node_wait_timeout
        say(f"waiting for {need} of {self.n} client nodes")
        while True:
            self._discover()
            if len(self.nodes) >= need:
                return
            if time.monotonic() > deadline:
                raise UserError(f"only {len(self.nodes)} of the {need} client nodes needed are ready after "
                                f"{self.settings.node_wait_timeout:g}s (clients {sorted(self.nodes)}); start more "
                                f"flower-supernode processes, fix the failing ones, or lower run config min-nodes")
            time.sleep(1.0)

    # ------------------------------------------------------------------ one round
    def run_round(self, rnd: int) -> tuple[RoundRecord, dict]:
        t0 = time.perf_counter()
        cfg, m = self.cfg, self.method
        self._forget_offline(rnd)
        self._discover()  # a node that (re)joined since the last round
        sampled = sample_clients(self.n, cfg.federation.fraction, cfg.seed, rnd)
        shared = self.server.shared_state()
        targets = {c: self.nodes[c] for c in sampled if c in self.nodes}
        replies, failed = self._exchange(M.GLOBAL, rnd, targets, shared)
        failed.update({c: "no node for this client" for c in sampled if c not in self.nodes})
        self._log_failures(rnd, M.GLOBAL, failed, targets)
        updates = []
        for cid in sorted(replies):  # the simulator's order: aggregation sums in client order
            try:
                updates.append(self._to_update(cid, replies[cid], shared))
            except (KeyError, TypeError, ValueError) as e:
                failed[cid] = f"malformed reply ({type(e).__name__}: {e})"
                say(f"round {rnd}: client {cid} sent a malformed reply: {e}")
        rejected: dict[int, str] = {}
        if m.shared and len(updates) >= self.settings.min_replies:
            report = self.server.aggregate(updates)
            rejected = report.rejected
        elif m.shared:
            say(f"round {rnd}: only {len(updates)} replies (min-replies {self.settings.min_replies}); "
                f"the global model is not updated this round")
        for cid, why in rejected.items():
            say(f"round {rnd}: update of client {cid} rejected: {why}")
        new_shared = self.server.shared_state()

        # local phase (clients that took part) and local evaluation (every client, at evaluation rounds)
        evaluate_now = rnd % cfg.eval.every == 0 or rnd == cfg.federation.rounds
        local = sorted(replies) if m.has_local_phase and cfg.train.personal_steps > 0 else []
        second = (set(local) | (set(self.nodes) if evaluate_now else set())) - set(failed)  # not asked twice
        targets2 = {c: self.nodes[c] for c in sorted(second)}
        flags = {c: {"local": c in local, "evaluate": evaluate_now} for c in targets2}
        replies2, failed2 = self._exchange(M.LOCAL, rnd, targets2, new_shared, flags)
        self._log_failures(rnd, M.LOCAL, failed2, targets2)
        for c, why in failed2.items():
            failed.setdefault(c, why)
        metrics2 = {c: r.content.metric_records.get(M.METRICS, {}) for c, r in replies2.items()}
        local_losses = [float(metrics2[c]["local-loss"]) for c in local if c in metrics2
                        and "local-loss" in metrics2[c]]

        losses = [(u.metrics["train_loss"], u.num_examples) for u in updates]
        good = [(l, e) for l, e in losses if np.isfinite(l) and e > 0]
        train_loss = sum(l * e for l, e in good) / max(1, sum(e for _, e in good)) if good else float("nan")
        up = float(np.mean([nbytes(u.state) for u in updates])) if updates else 0.0
        rec = RoundRecord(rnd, sampled, train_loss, float(np.mean(local_losses)) if local_losses else None,
                          sum(e for _, e in losses), up, float(nbytes(shared)) if m.shared else 0.0, rejected, 0.0)
        if evaluate_now:
            t = time.perf_counter()
            rec.eval = self.evaluate(metrics2)
            rec.eval["wall_time"] = time.perf_counter() - t
        rec.wall_time = time.perf_counter() - t0
        return rec, {"failed": {str(c): why for c, why in sorted(failed.items())},
                     "nodes": {str(c): self.nodes.get(c) for c in sampled}}

    @staticmethod
    def _to_update(cid: int, reply: Message, like) -> ClientUpdate:
        c = reply.content
        mr = c.metric_records[M.METRICS]
        state = M.from_record(c.array_records[M.UPDATE], like) if M.UPDATE in c.array_records else {}
        return ClientUpdate(cid, state, int(mr["num-examples"]),
                            {"train_loss": float(mr["train-loss"]), "steps": int(mr["steps"]),
                             "diverged": bool(mr["diverged"])})

    def evaluate(self, client_metrics: dict) -> dict:
        """Global model on the server (what it holds); local models as evaluated by the clients on their nodes."""
        ev = self.sim.evaluator  # the simulator's Evaluator: same sets, same per-label means
        self.sim.am.load_state(protocol.global_eval_state(self.method, self.server.global_state, []))
        out: dict = {"split": self.cfg.eval.split, "global": ev._labelled(ev._global_sets())}
        if self.method.personal:
            out["global"]["note"] = GLOBAL_NOTE_PERSONAL
        if self.ws.data.unseen_test and self.cfg.eval.split == "test":
            out["unseen"] = ev._labelled(self.ws.data.unseen_test)
        per_client = []
        for c in range(self.n):
            r = client_metrics.get(c)
            if r is None or "eval-loss" not in r:
                per_client.append({"loss": None, "rouge_l": None, "examples": 0, "tokens": 0, "missing": True})
                continue
            per_client.append({"loss": float(r["eval-loss"]), "rouge_l": r.get("eval-rouge-l"),
                               "examples": int(r["eval-examples"]), "tokens": int(r["eval-tokens"])})
        losses = [p["loss"] for p in per_client if p["loss"] is not None]
        rouges = [p["rouge_l"] for p in per_client if p["rouge_l"] is not None]
        out["local"] = {"loss": float(np.mean(losses)) if losses else float("nan"),
                        "rouge_l": float(np.mean(rouges)) if rouges else None,
                        "per_client": per_client, "evaluated_on": "each client's node"}
        return out

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        t0 = time.perf_counter()
        lines = list(self.resume.metrics) if self.resume else []
        if self.resume:
            say(f"resuming after round {self.resume.round} of {self.cfg.federation.rounds} "
                f"(checkpoint {self.resume.path.relative_to(self.out)})")
            self.store.prune()  # leftovers of the crash: torn temporary checkpoints, a checkpoint too many
        res.atomic_write(self.out / "config.yaml", self.config_yaml)
        metrics_path = self.out / "metrics.jsonl"
        res.atomic_write(metrics_path, "".join(lines))
        try:
            return self._run(t0, metrics_path, lines)
        finally:
            self.received.close()

    def _run(self, t0: float, metrics_path: Path, lines: list[str]) -> dict:
        cfg = self.cfg
        elapsed_before = self.resume.elapsed if self.resume else 0.0
        self.connect()
        history = [json.loads(line) for line in lines]
        for rnd in range(self.resume_round + 1, cfg.federation.rounds + 1):
            rec, extra = self.run_round(rnd)
            row = {**rec.as_dict(), **extra}
            history.append(row)
            line = json.dumps(row, default=float) + "\n"
            lines.append(line)
            with open(metrics_path, "a") as f:
                f.write(line)
            say(round_line(rec) + (f" | failed: {sorted(int(c) for c in extra['failed'])}" if extra["failed"] else ""))
            if is_due(rnd, cfg.federation.rounds, cfg.output.checkpoint_every):
                self.store.save(rnd, {"runtime": "flower", "server": self.server.state_dict()}, lines,
                                self.config_yaml, self.ws.data.fingerprint,
                                elapsed_before + time.perf_counter() - t0)
        wall = elapsed_before + time.perf_counter() - t0
        row = res.summary_row(cfg.method, history, self.sim.parameter_counts(), wall)
        note = ""
        if self.method.personal:
            note = (f"\nGlobal model = {GLOBAL_NOTE_PERSONAL}. Local models are evaluated on the clients' nodes; "
                    f"their personalized adapters are exported there (node config export-dir).\n")
        (self.out / "results.md").write_text(res.results_table([row]) + note)
        if cfg.output.plots:
            res.plot_curves({cfg.method: history}, self.out / "curves.png")
        if cfg.output.save_adapters:
            self.sim.am.export_peft(self.server.global_state, self.out / "adapters" / "global")
            torch.save({k: v.detach().cpu() for k, v in self.server.global_state.items()},
                       self.out / "global_state.pt")
        # written last: its presence means the run finished (as with `fedlora run`)
        res.write_json(self.out / "results.json", {
            "summary": row, "history": history, "method": self.method.summary,
            "provenance": res.provenance(cfg, self.ws.data, {
                "wall_time": wall, "device": self.ws.device, "runtime": "flower", "resumed": bool(self.resume),
                "nodes": {str(c): n for c, n in sorted(self.nodes.items())},
                "run_settings": self.settings.as_run_config()}),
        })
        say(f"results written to {self.out}/")
        return row


def make_server_app(defaults: dict | None = None) -> ServerApp:
    """A ServerApp; `defaults` are run-config values that the run's own run config overrides."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = RunSettings.from_run_config({**(defaults or {}), **dict(context.run_config)})
        cfg = settings.load()
        ckpt = None
        if settings.resume:
            out = Path(cfg.output.dir)
            ckpt, skipped, finished = open_for_resume(out, "run config resume")
            if check_resume(out, ckpt, finished, cfg, force=settings.force, label="run config resume",
                            force_hint="resume with the run's config and set, or set force=true"):
                say(f"{out}: the run already finished ({cfg.federation.rounds} rounds); nothing to do")
                return
            for name, why in skipped.items():
                say(f"checkpoint {name} is incomplete ({why}); using {ckpt.path.name}")
        else:
            out = res.prepare_run_dir(cfg.output.dir, cfg.output.overwrite)
        FlowerRun(grid, cfg, settings, out, resume=ckpt).run()

    return server_app


app = make_server_app()
