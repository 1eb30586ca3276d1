"""The in-process simulator: ONE base model, every client's adapter swapped in and out, rounds of the method's policy."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .adapters import AdapterModel
from .checkpoint import fault_point
from .client import FedClient
from .core import protocol
from .core.components import State, clone, nbytes, numel, select, transfer_dtype
from .core.methods import Method, build_method
from .core.robust import RobustOptions
from .core.server import Server
from .core.server_opt import build_server_optimizer
from .data.federated import FederatedData
from .data.prompts import PromptFormatter
from .evaluate import evaluate

Log = Callable[[str], None]


def sample_clients(num_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    k = max(1, int(round(fraction * num_clients)))
    if k >= num_clients:
        return list(range(num_clients))
    return sorted(np.random.default_rng([seed, rnd, 7]).choice(num_clients, size=k, replace=False).tolist())


@dataclass
class RoundRecord:
    round: int
    sampled: list[int]
    train_loss: float
    local_phase_loss: float | None
    examples: int
    bytes_up: float
    bytes_down: float
    rejected: dict[int, str]
    wall_time: float
    eval: dict | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, row: Mapping) -> RoundRecord:
        """From a metrics.jsonl row (extra keys, e.g. the Flower runtime's, are ignored)."""
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls) if f.name in row})


@dataclass
class Evaluator:
    """Global and local evaluation, shared by every runtime."""

    am: AdapterModel
    fmt: PromptFormatter
    data: FederatedData
    cfg: object

    def _labelled(self, sets: dict) -> dict:
        """Per-label evaluation, then the unweighted mean over labels (each category/task counts equally)."""
        e = self.cfg.eval
        per = max(1, e.max_global_examples // max(1, len(sets)))
        results = {lab: evaluate(self.am, self.fmt, exs, e, per) for lab, exs in sets.items()}
        rouges = [r.rouge_l for r in results.values() if r.rouge_l is not None]
        return {
            "loss": float(np.mean([r.loss for r in results.values()])),
            "rouge_l": float(np.mean(rouges)) if rouges else None,
            "per_label": {lab: r.as_dict() for lab, r in results.items()},
        }

    def _split(self, client) -> list:
        return client.validation if self.cfg.eval.split == "validation" else client.test

    def _global_sets(self) -> dict:
        if self.cfg.eval.split == "test":
            return self.data.global_test
        pooled: dict = {}
        for c in self.data.clients:
            for e in c.validation:
                pooled.setdefault(e.label, []).append(e)
        return dict(sorted(pooled.items()))

    def run(self, method: Method, global_state: State, personals: dict[int, State]) -> dict:
        out: dict = {"split": self.cfg.eval.split}
        n = len(self.data.clients)
        self.am.load_state(protocol.global_eval_state(method, global_state, [personals.get(c) for c in range(n)]))
        out["global"] = self._labelled(self._global_sets())
        if method.personal:
            out["global"]["note"] = "shared components + mean of the clients' personal components"
        if self.data.unseen_test and self.cfg.eval.split == "test":
            out["unseen"] = self._labelled(self.data.unseen_test)
        per_client = []
        for c, cd in enumerate(self.data.clients):
            self.am.load_state(protocol.local_model_state(method, global_state, personals.get(c)))
            r = evaluate(self.am, self.fmt, self._split(cd), self.cfg.eval, self.cfg.eval.max_examples_per_client)
            per_client.append(r.as_dict())
        rouges = [r["rouge_l"] for r in per_client if r["rouge_l"] is not None]
        out["local"] = {
            "loss": float(np.mean([r["loss"] for r in per_client])),
            "rouge_l": float(np.mean(rouges)) if rouges else None,
            "per_client": per_client,
        }
        return out


@dataclass
class Simulation:
    cfg: object
    tokenizer: object
    base_model: torch.nn.Module
    data: FederatedData
    log: Log = print
    progress: object | None = None
    method: Method = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.cfg
        mo = cfg.method_options
        self.method = build_method(cfg.method, mo, rank=cfg.lora.r)
        self.am = AdapterModel(self.base_model, self.method.adapter, cfg.lora, norm_axis_a=mo.norm_axis_a,
                               norm_axis_b=mo.norm_axis_b, b_mag_init=mo.b_mag_init,
                               b_dir_init_norm=mo.b_dir_init_norm, seed=cfg.seed,
                               base_name=cfg.model.name)
        self.fmt = PromptFormatter(self.tokenizer, cfg.data.template, cfg.data.max_length)
        rows = [[self.fmt.encode(e) for e in c.train] for c in self.data.clients]
        self.train_rows = [sum(rows, [])] if self.method.pooled else rows
        self.client = FedClient(self.am, self.method, cfg, self.tokenizer.pad_token_id, log=self.log)
        self.server = Server(self.method, self.am.init_state, build_server_optimizer(cfg.federation), self.am.axes,
                             RobustOptions.from_config(cfg.federation),
                             keep_direction_scale=mo.direction_scale == "keep",
                             transfer_dtype=transfer_dtype(cfg.federation.transfer_dtype))
        self.personal: dict[int, State] = {}
        self.evaluator = Evaluator(self.am, self.fmt, self.data, cfg)
        self.history: list[RoundRecord] = []

    # ------------------------------------------------------------------ accounting
    def parameter_counts(self) -> dict:
        st = self.am.init_state
        return {
            "trainable": numel(select(st, set(self.method.global_train) | set(self.method.local_train))),
            "communicated": numel(select(st, self.method.shared)),
            "personal": numel(select(st, self.method.personal)),
        }

    # ------------------------------------------------------------------ one round
    def run_round(self, rnd: int) -> RoundRecord:
        t0 = time.perf_counter()
        cfg, m = self.cfg, self.method
        n = len(self.data.clients)
        sampled = [0] if m.pooled else sample_clients(n, cfg.federation.fraction, cfg.seed, rnd)
        scale = len(sample_clients(n, cfg.federation.fraction, cfg.seed, rnd)) if m.pooled else 1
        shared = self.server.shared_state()
        down = nbytes(shared)
        updates, losses = [], []
        jobs = [(cid, rnd, shared, self.personal.get(cid), self.train_rows[cid],
                 self.client.steps_for(len(self.train_rows[cid]), scale)) for cid in sampled]
        if cfg.federation.lockstep:  # all sampled clients in one batched forward/backward (fedlora.lockstep)
            results = self.client.global_phases(jobs)
        else:
            results = (self.client.global_phase(*job) for job in jobs)
        for cid, res in zip(sampled, results):
            self.personal[cid] = res.personal
            updates.append(res.update)
            losses.append((res.stats.loss, res.stats.examples))
            self._tick()
            fault_point("train", rnd)
        report = self.server.aggregate(updates) if m.shared else None
        rejected = report.rejected if report else {}
        for cid, why in rejected.items():
            self.log(f"round {rnd}: update of client {cid} rejected: {why}")
        new_shared = self.server.shared_state()
        local_losses = []
        if m.has_local_phase:
            jobs = [(cid, rnd, new_shared, self.personal.get(cid), self.train_rows[cid]) for cid in sampled]
            for cid, (personal, st) in zip(sampled, self.client.local_phases(jobs)):
                self.personal[cid] = personal
                local_losses.append(st.loss)
        good = [(l, e) for l, e in losses if np.isfinite(l) and e > 0]
        train_loss = sum(l * e for l, e in good) / max(1, sum(e for _, e in good)) if good else float("nan")
        up = float(np.mean([nbytes(u.state) for u in updates])) if updates and not m.pooled else 0.0
        return RoundRecord(rnd, sampled, train_loss, float(np.mean(local_losses)) if local_losses else None,
                           sum(e for _, e in losses), up, float(down) if m.shared and not m.pooled else 0.0, rejected,
                           time.perf_counter() - t0)

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress()

    def evaluate(self) -> dict:
        personals = self.personal
        if self.method.pooled:  # the centralized model is every client's model
            personals = {}
        return self.evaluator.run(self.method, self.server.global_state, personals)

    def run(self, on_round: Callable[[RoundRecord], None] | None = None, start_round: int = 1) -> list[RoundRecord]:
        rounds = self.cfg.federation.rounds
        for rnd in range(start_round, rounds + 1):
            rec = self.run_round(rnd)
            if rnd % self.cfg.eval.every == 0 or rnd == rounds:
                t = time.perf_counter()
                rec.eval = self.evaluate()
                rec.eval["wall_time"] = time.perf_counter() - t
            self.history.append(rec)
            if on_round:
                on_round(rec)
        return self.history

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything that changes from round to round (the rest is rebuilt from config + seed on resume).

        Client sampling and every training phase are seeded by (seed, round[, client, phase]), so no sampler
        state exists; the global torch RNG is saved anyway, for anything that might draw from it between phases.
        """
        return {
            "server": self.server.state_dict(),
            "personal": {int(c): clone(s, "cpu") for c, s in self.personal.items()},  # insertion order kept
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: Mapping, history: list[RoundRecord] | None = None) -> None:
        """Restore `state_dict()` (checked against this adapter first: ValueError if it does not fit)."""
        init = self.am.init_state
        names = {n: n for n in self.am.params}  # the model's own name strings, so saved files pickle identically
        personal = {}
        for c, s in state["personal"].items():
            c = int(c)
            if not 0 <= c < len(self.data.clients):
                raise ValueError(f"saved personal state of client {c}, but the run has {len(self.data.clients)}")
            for k, v in s.items():
                if k not in init or tuple(v.shape) != tuple(init[k].shape) or v.dtype != init[k].dtype:
                    raise ValueError(f"saved personal state of client {c} does not fit this adapter ({k})")
            personal[c] = {names[k]: v for k, v in clone(s, self.am.device).items()}
        self.server.load_state_dict(state["server"])
        self.personal = personal
        torch.set_rng_state(state["torch_rng"])
        self.history = list(history or [])

    def local_state(self, cid: int) -> State:
        return protocol.local_model_state(self.method, self.server.global_state, self.personal.get(cid))

    def global_eval_state(self) -> State:
        n = len(self.data.clients)
        return protocol.global_eval_state(self.method, self.server.global_state,
                                          [self.personal.get(c) for c in range(n)])
