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
from .evaluator import GlobalEvaluator, federated_summary, local_summary
from .transport import Exchange, Transport

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
    tokens: float | None = None
    """Tokens trained on per client that took part (both phases), the round's mean (None: not reported)."""
    failed: dict[str, str] = field(default_factory=dict)
    """Clients that did not answer a request this round, and why (a real federation's failures)."""
    privacy: dict | None = None
    """Differential privacy of the round (`core.server.RoundReport.privacy`); None (and not written) when off."""
    info: dict = field(default_factory=dict)
    """Runtime-specific fields (e.g. which node served which client), written at the top level of the row."""

    def as_dict(self) -> dict:
        row = {k: v for k, v in self.__dict__.items() if k != "info" and not (k == "privacy" and v is None)}
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
                 init_state: State, log: Log = print, min_replies: int = 1, federated_eval: bool = False):
        self.cfg, self.method, self.server, self.evaluator = cfg, method, server, evaluator
        self.transport, self.init_state, self.log, self.min_replies = transport, init_state, log, min_replies
        self.n = cfg.federation.clients
        self.history: list[RoundRecord] = []
        self.base_eval: dict | None = None
        """The base model's evaluation (round 0: fused into round 1's exchange), once the run has it."""
        self.open: OpenRound | None = None
        """The round whose local phase and evaluations wait for the next exchange."""
        self.federated_eval = federated_eval
        """Clients also evaluate the global model on their own held-out rows (`federated` in each evaluation;
        the global score when the server holds no global test set, e.g. clients with their own data)."""
        self.want_base = False
        """Evaluate the base model in the first exchange (round 0 of the run)."""
        self.on_round: Callable[[RoundRecord], None] | None = None
        """Called with each round as it finishes (run_engine writes it)."""
        self.on_base: Callable[[dict], None] | None = None
        """Called once the base model's evaluation is known (run_engine prints it)."""
        self._elapsed = 0.0

    # ------------------------------------------------------------------ accounting
    def parameter_counts(self) -> dict:
        st, m = self.init_state, self.method
        return {"trainable": numel(select(st, set(m.global_train) | set(m.local_train))),
                "communicated": numel(select(st, m.shared)),
                "personal": numel(select(st, m.personal))}

    # ------------------------------------------------------------------ rounds, one exchange each
    def step(self, rnd: int) -> RoundRecord | None:
        """Round `rnd`'s one exchange, then its aggregation.

        The exchange carries the server's shared state S_{rnd-1} to the clients, which first finish the open
        round rnd-1 on it (its local phase and evaluations: S_{rnd-1} is that round's aggregate) and then run
        round rnd's global phase from it. The server aggregates the uploads into S_rnd, evaluates the global
        model if due, and leaves round rnd open until the next exchange (`step(rnd + 1)` or `finish()`).
        Returns the round this exchange finished, if one was open.
        """
        cfg, m = self.cfg, self.method
        self.transport.prepare(rnd)
        sampled = [0] if m.pooled else sample_clients(self.n, cfg.federation.fraction, cfg.seed, rnd)
        shared = self.server.shared_state()
        answers, replies, failed = self._exchange(shared, sampled, rnd)
        finished = self._close(answers, failed, 0.0)
        t0 = time.perf_counter()
        updates = [replies[c] for c in sorted(replies)]  # aggregation sums in client order, in every runtime
        rejected: dict[int, str] = {}
        privacy = None
        if m.shared and len(updates) >= self.min_replies:
            report = self.server.aggregate(updates)
            rejected, privacy = report.rejected, report.privacy
        elif m.shared:
            self.log(f"round {rnd}: only {len(updates)} replies (min-replies {self.min_replies}); "
                     f"the global model is not updated this round")
        for cid, why in rejected.items():
            self.log(f"round {rnd}: update of client {cid} rejected: {why}")
        failed_now = {c: why for c, why in failed.items() if c in sampled}
        rec = RoundRecord(rnd, sampled, _mean_train_loss(updates), None, sum(u.num_examples for u in updates),
                          float(np.mean([nbytes(u.state) for u in updates])) if updates and not m.pooled else 0.0,
                          float(nbytes(shared)) if m.shared and not m.pooled else 0.0, rejected, 0.0,
                          failed={str(c): why for c, why in sorted(failed_now.items())}, privacy=privacy,
                          info=self.transport.round_info(sampled))
        evaluate_now = is_due(rnd, cfg.federation.rounds, cfg.eval.every)  # every k rounds and after the last
        local = set(replies) if m.has_local_phase and cfg.train.personal_steps > 0 else set()
        asked = (local | (set(self.transport.reachable()) if evaluate_now else set())) - set(failed_now)
        if evaluate_now:
            t = time.perf_counter()
            rec.eval = {"split": cfg.eval.split, **self._server_eval(self.server.global_state, rnd)}
            rec.eval["wall_time"] = time.perf_counter() - t
        self.open = OpenRound(rec, {c: LocalTask(train=c in local, evaluate=evaluate_now,
                                                 evaluate_global=evaluate_now and self.federated_eval)
                                    for c in sorted(asked)},
                              {u.client_id: int(u.metrics.get("steps", 0)) for u in updates},
                              self._elapsed + time.perf_counter() - t0,
                              {u.client_id: int(u.metrics["tokens"]) for u in updates if "tokens" in u.metrics})
        return finished

    def finish(self) -> RoundRecord | None:
        """The closing exchange: the open round's local phase and evaluations, with no global phase."""
        if self.open is None:
            return None
        self.transport.prepare(self.open.record.round + 1)
        answers, _, failed = self._exchange(self.server.shared_state(), [], self.open.record.round + 1)
        return self._close(answers, failed, self._elapsed)

    def run_round(self, rnd: int) -> RoundRecord:
        """Round `rnd` alone, both halves (for callers that drive single rounds)."""
        self.step(rnd)
        return self.finish()

    def _exchange(self, shared: State, sampled: list[int], rnd: int):
        t = time.perf_counter()
        o = self.open
        req = Exchange(shared, o.record.round if o else rnd - 1, dict(o.tasks) if o else {}, rnd, sampled)
        if o is None and self.want_base:  # round 0: the base model on every reachable client, fused into round 1
            req.tasks = {c: LocalTask(base=True) for c in self.transport.reachable()}
        answers, replies, failed = self.transport.exchange(req) if req.tasks or req.train else ({}, {}, {})
        self._elapsed = time.perf_counter() - t
        if o is None and req.tasks:
            self.want_base = False
            self._base(answers, self._elapsed)
        return answers, replies, failed

    def _close(self, answers: Mapping[int, dict], failed: Mapping[int, str], seconds: float) -> RoundRecord | None:
        """Finish the open round with its clients' answers (local-phase losses and steps, evaluations)."""
        o, self.open = self.open, None
        if o is None:
            return None
        rec, t = o.record, time.perf_counter()
        local_losses = [answers[c]["local-loss"] for c in sorted(o.tasks) if "local-loss" in answers.get(c, {})]
        rec.local_phase_loss = float(np.mean(local_losses)) if local_losses else None
        steps = [s + int(answers.get(c, {}).get("local-steps", 0)) for c, s in sorted(o.global_steps.items())]
        rec.steps = float(np.mean(steps)) if steps else None
        tokens = [n + int(answers.get(c, {}).get("local-tokens", 0)) for c, n in sorted(o.global_tokens.items())]
        rec.tokens = float(np.mean(tokens)) if tokens else None
        for c in sorted(o.tasks):
            if c in failed:
                rec.failed.setdefault(str(c), failed[c])
        rec.failed = dict(sorted(rec.failed.items(), key=lambda kv: int(kv[0])))
        if rec.eval is not None:
            rec.eval.update(self._client_evals(answers))
            with_global(rec.eval)["wall_time"] += time.perf_counter() - t
        rec.wall_time = o.seconds + seconds + time.perf_counter() - t
        self.history.append(rec)
        if self.on_round:
            self.on_round(rec)
        return rec

    # ------------------------------------------------------------------ evaluation
    def _server_eval(self, state: State | None, rnd: int | None = None) -> dict:
        """The global model (the server's state after round `rnd`; None: the base model) on the server's own
        global sets."""
        if not self.evaluator.has_sets():
            return {}
        out = self.evaluator.evaluate(state, rnd) if state is not None else self.evaluator.evaluate_base()
        note = global_model_note(self.method)
        if note and state is not None:
            out["global"]["note"] = note
        return out

    def _client_evals(self, answers: Mapping[int, dict]) -> dict:
        """The clients' reports: their local models, and (federated evaluation) the global model on their rows."""
        out = {"local": local_summary({c: a.get("eval") for c, a in answers.items()}, self.n)}
        if self.federated_eval:
            out["federated"] = federated_summary({c: a.get("global-eval") for c, a in answers.items()}, self.n)
        return out

    def _base(self, answers: Mapping[int, dict], seconds: float) -> None:
        t = time.perf_counter()
        out = {"split": self.cfg.eval.split, **self._server_eval(None),
               "local": local_summary({c: a.get("eval") for c, a in answers.items()}, self.n)}
        if self.federated_eval:  # with no adapter, the global model IS each client's local model
            out["federated"] = federated_summary({c: a.get("eval") for c, a in answers.items()}, self.n)
        self.base_eval = with_global(out)
        self.base_eval["wall_time"] = seconds + time.perf_counter() - t
        if self.on_base:
            self.on_base(self.base_eval)

    def evaluate(self, answers: Mapping[int, dict]) -> dict:
        """The global model (the server's state) and what the clients reported (`ClientHost.local_round`)."""
        return with_global({"split": self.cfg.eval.split, **self._server_eval(self.server.global_state),
                            **self._client_evals(answers)})

    def evaluate_base(self) -> dict:
        """The base model alone, in an exchange of its own (`run` fuses it into round 1's)."""
        self.transport.prepare(0)
        self.want_base = True
        self._exchange(self.server.shared_state(), [], 0)
        return self.base_eval

    def run(self, on_round: Callable[[RoundRecord], None] | None = None, start_round: int = 1,
            on_checkpoint: Callable[[int], None] | None = None) -> list[RoundRecord]:
        """Rounds `start_round`..rounds, then the closing exchange. `on_round(rec)` as each round finishes;
        `on_checkpoint(r)` when the engine's state is a consistent point to save: after round r's aggregation
        (round r still open), and after the closing exchange (nothing open)."""
        self.on_round = on_round or self.on_round
        rounds = self.cfg.federation.rounds
        for rnd in range(start_round, rounds + 1):
            self.step(rnd)
            if on_checkpoint and rnd < rounds:
                on_checkpoint(rnd)
        if self.finish() is not None and on_checkpoint:
            on_checkpoint(rounds)
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything that changes from round to round (the rest is rebuilt from config + seed on resume).

        Client sampling and every training phase are seeded by (seed, round[, client, phase]), so no sampler
        state exists; the global torch RNG is saved anyway, for anything that might draw from it between phases.
        The open round (aggregated, its local phase still to run) is saved with its tasks.
        """
        return {"runtime": self.transport.runtime, "server": self.server.state_dict(),
                "torch_rng": torch.get_rng_state(), "open": self.open.as_dict() if self.open else None,
                "base": self.base_eval, **self.transport.state_dict()}

    def load_state_dict(self, state: Mapping, history: Sequence[RoundRecord] = ()) -> None:
        """Restore `state_dict()` (checked against this adapter first: ValueError if it does not fit)."""
        self.transport.load_state_dict(state)
        self.server.load_state_dict(state["server"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        self.open = OpenRound.from_dict(state["open"]) if state.get("open") else None
        self.base_eval = state.get("base", self.base_eval)
        self.history = list(history)


@dataclass
class OpenRound:
    """A round that is aggregated but whose local phase and evaluations wait for the next exchange."""

    record: RoundRecord
    tasks: dict[int, LocalTask]
    global_steps: dict[int, int]
    seconds: float
    """Wall time of the round so far (its exchange and the server's work)."""
    global_tokens: dict[int, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"record": self.record.as_dict(), "seconds": self.seconds,
                "tasks": {str(c): dataclasses.asdict(t) for c, t in self.tasks.items()},
                "global_steps": {str(c): s for c, s in self.global_steps.items()},
                "global_tokens": {str(c): n for c, n in self.global_tokens.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> OpenRound:
        return cls(RoundRecord.from_dict(d["record"]), {int(c): LocalTask(**t) for c, t in d["tasks"].items()},
                   {int(c): int(s) for c, s in d["global_steps"].items()}, float(d["seconds"]),
                   {int(c): int(n) for c, n in d.get("global_tokens", {}).items()})


def with_global(ev: dict) -> dict:
    """With federated evaluation, "global" is the clients' example-weighted score of the global model; the
    server's own test file, if it has one, moves to "server_test". Otherwise "global" is the server's sets."""
    if "federated" in ev and "server_test" not in ev and ev.get("global") != ev["federated"]:
        if "global" in ev:
            ev["server_test"] = ev["global"]
        ev["global"] = ev["federated"]
    return ev


def _mean_train_loss(updates: Sequence[ClientUpdate]) -> float:
    good = [(u.metrics["train_loss"], u.num_examples) for u in updates
            if np.isfinite(u.metrics["train_loss"]) and u.num_examples > 0]
    return sum(l * e for l, e in good) / max(1, sum(e for _, e in good)) if good else float("nan")
