"""THE round engine: one implementation of a federated round, driven over a `transport.Transport`.

Per round t:
  1. sample clients, seeded by (seed, t): the same clients in every runtime;
  2. global phase: the sampled clients train from the server's shared state and upload their shared
     components (transport);
  3. aggregate the uploads that arrived, in client order (`core.server.Server`): the server's new state
     is THE global model, in every runtime; nothing personal is in it;
  4. local phase: the clients that took part run their local optimizer from the new global state, and
     at evaluation rounds every reachable client evaluates its local model on its own rows (transport);
  5. the server evaluates the global model it holds (`GlobalEvaluator`);
  6. record the round (`RoundRecord`, one line of metrics.jsonl).

Before round 1 the untrained base model is evaluated on the same global and local sets
(`evaluate_base`): the reference row of every results table.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .checkpoint import is_due
from .client_host import LocalTask
from .core.aggregate import ClientUpdate
from .core.components import State, nbytes, numel, select
from .core.methods import Method
from .core.server import Server
from .evaluator import GlobalEvaluator, local_summary
from .transport import Transport

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
    steps: float | None = None
    """Optimizer steps per client that took part (global phase + local phase), the round's mean: equal compute."""
    failed: dict[str, str] = field(default_factory=dict)
    """Clients that did not answer a request this round, and why (a real federation's failures)."""
    info: dict = field(default_factory=dict)
    """Runtime-specific fields (e.g. which node served which client), written at the top level of the row."""

    def as_dict(self) -> dict:
        row = {k: v for k, v in self.__dict__.items() if k != "info"}
        return {**row, **self.info}

    @classmethod
    def from_dict(cls, row: Mapping) -> RoundRecord:
        """From a metrics.jsonl row (unknown keys go back into `info`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        rec = cls(**{k: row[k] for k in names if k in row and k != "info"})
        rec.info = {k: v for k, v in row.items() if k not in names}
        return rec


def global_model_note(method: Method) -> str | None:
    """What the server's global model holds for components that only the clients have."""
    client_only = sorted(set(method.personal) - set(method.shared))
    if not client_only or method.pooled:
        return None
    return (f"the server's state; {', '.join(client_only)} never leave the clients, so the global model holds "
            f"{'them' if len(client_only) > 1 else 'it'} at the initial value")


class RoundEngine:
    def __init__(self, cfg, method: Method, server: Server, evaluator: GlobalEvaluator, transport: Transport,
                 init_state: State, log: Log = print, min_replies: int = 1):
        self.cfg, self.method, self.server, self.evaluator = cfg, method, server, evaluator
        self.transport, self.init_state, self.log, self.min_replies = transport, init_state, log, min_replies
        self.n = cfg.federation.clients
        self.history: list[RoundRecord] = []
        self.base_eval: dict | None = None
        """The base model's evaluation (`evaluate_base`), once the run has it."""

    # ------------------------------------------------------------------ accounting
    def parameter_counts(self) -> dict:
        st, m = self.init_state, self.method
        return {"trainable": numel(select(st, set(m.global_train) | set(m.local_train))),
                "communicated": numel(select(st, m.shared)),
                "personal": numel(select(st, m.personal))}

    # ------------------------------------------------------------------ one round
    def run_round(self, rnd: int) -> RoundRecord:
        t0 = time.perf_counter()
        cfg, m = self.cfg, self.method
        self.transport.prepare(rnd)
        sampled = [0] if m.pooled else sample_clients(self.n, cfg.federation.fraction, cfg.seed, rnd)
        shared = self.server.shared_state()
        replies, failed = self.transport.global_phase(rnd, sampled, shared)
        updates = [replies[c] for c in sorted(replies)]  # aggregation sums in client order, in every runtime
        rejected: dict[int, str] = {}
        if m.shared and len(updates) >= self.min_replies:
            rejected = self.server.aggregate(updates).rejected
        elif m.shared:
            self.log(f"round {rnd}: only {len(updates)} replies (min-replies {self.min_replies}); "
                     f"the global model is not updated this round")
        for cid, why in rejected.items():
            self.log(f"round {rnd}: update of client {cid} rejected: {why}")
        new_shared = self.server.shared_state()

        evaluate_now = is_due(rnd, cfg.federation.rounds, cfg.eval.every)  # every k rounds and after the last
        local = set(replies) if m.has_local_phase and cfg.train.personal_steps > 0 else set()
        asked = (local | (set(self.transport.reachable()) if evaluate_now else set())) - set(failed)
        tasks = {c: LocalTask(train=c in local, evaluate=evaluate_now) for c in sorted(asked)}
        answers, failed2 = self.transport.local_round(rnd, tasks, new_shared) if tasks else ({}, {})
        for c, why in failed2.items():
            failed.setdefault(c, why)
        local_losses = [answers[c]["local-loss"] for c in sorted(local) if "local-loss" in answers.get(c, {})]
        steps = [int(u.metrics.get("steps", 0)) + int(answers.get(u.client_id, {}).get("local-steps", 0))
                 for u in updates]

        rec = RoundRecord(rnd, sampled, _mean_train_loss(updates),
                          float(np.mean(local_losses)) if local_losses else None,
                          sum(u.num_examples for u in updates),
                          float(np.mean([nbytes(u.state) for u in updates])) if updates and not m.pooled else 0.0,
                          float(nbytes(shared)) if m.shared and not m.pooled else 0.0, rejected, 0.0,
                          steps=float(np.mean(steps)) if steps else None, failed={str(c): why for c, why in sorted(failed.items())},
                          info=self.transport.round_info(sampled))
        if evaluate_now:
            t = time.perf_counter()
            rec.eval = self.evaluate({c: a.get("eval") for c, a in answers.items()})
            rec.eval["wall_time"] = time.perf_counter() - t
        rec.wall_time = time.perf_counter() - t0
        return rec

    def evaluate(self, local: Mapping[int, dict | None]) -> dict:
        """The global model (the server's state) and the clients' reports on their local models."""
        out = {"split": self.cfg.eval.split, **self.evaluator.evaluate(self.server.global_state)}
        note = global_model_note(self.method)
        if note:
            out["global"]["note"] = note
        out["local"] = local_summary(local, self.n)
        return out

    def evaluate_base(self) -> dict:
        """The untrained base model on the same global sets and every reachable client's own rows."""
        t = time.perf_counter()
        self.transport.prepare(0)
        answers, _ = self.transport.local_round(0, {c: LocalTask(base=True) for c in self.transport.reachable()},
                                                None)
        out = {"split": self.cfg.eval.split, **self.evaluator.evaluate_base(),
               "local": local_summary({c: a.get("eval") for c, a in answers.items()}, self.n)}
        out["wall_time"] = time.perf_counter() - t
        return out

    def run(self, on_round: Callable[[RoundRecord], None] | None = None, start_round: int = 1) -> list[RoundRecord]:
        for rnd in range(start_round, self.cfg.federation.rounds + 1):
            rec = self.run_round(rnd)
            self.history.append(rec)
            if on_round:
                on_round(rec)
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything that changes from round to round (the rest is rebuilt from config + seed on resume).

        Client sampling and every training phase are seeded by (seed, round[, client, phase]), so no sampler
        state exists; the global torch RNG is saved anyway, for anything that might draw from it between phases.
        """
        return {"runtime": self.transport.runtime, "server": self.server.state_dict(),
                "torch_rng": torch.get_rng_state(), **self.transport.state_dict()}

    def load_state_dict(self, state: Mapping, history: Sequence[RoundRecord] = ()) -> None:
        """Restore `state_dict()` (checked against this adapter first: ValueError if it does not fit)."""
        self.transport.load_state_dict(state)
        self.server.load_state_dict(state["server"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        self.history = list(history)


def _mean_train_loss(updates: Sequence[ClientUpdate]) -> float:
    good = [(u.metrics["train_loss"], u.num_examples) for u in updates
            if np.isfinite(u.metrics["train_loss"]) and u.num_examples > 0]
    return sum(l * e for l, e in good) / max(1, sum(e for _, e in good)) if good else float("nan")
