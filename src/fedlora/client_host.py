"""The client side of a round for the clients hosted in one process, over ONE adapter model.

In the in-process simulator one `ClientHost` hosts every client (their adapters swapped in and out of
one base model); on a Flower node it hosts the node's own client. It knows the clients' encoded
training rows, their held-out evaluation rows and their `PersonalStore`, and answers the two
requests of a round (see `transport`): the global phase, and the local phase with evaluation of
the client's local model. Nothing here knows how the requests arrived.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .adapters import AdapterModel
from .client import FedClient
from .core import protocol
from .core.aggregate import ClientUpdate
from .core.components import State
from .core.methods import Method
from .data.examples import Example
from .data.prompts import Encoded, PromptFormatter
from .evaluate import evaluate
from .personal import PersonalStore
from .training import PhaseStats


@dataclass(frozen=True)
class LocalTask:
    """What a client does in the second half of a round."""

    train: bool = False
    """Run the local phase (the local optimizer of its personal components) from the new global state."""
    evaluate: bool = False
    """Evaluate its local model (global state + its personal components) on its own held-out rows."""
    base: bool = False
    """Evaluate the base model with no adapter instead (the reference row, before round 1)."""
    evaluate_global: bool = False
    """Also evaluate the global model (the server's state as sent) on its own held-out rows: federated evaluation."""


class ClientHost:
    def __init__(self, am: AdapterModel, method: Method, cfg, fmt: PromptFormatter, pad_id: int,
                 train_rows: Mapping[int, Sequence[Encoded]], eval_rows: Mapping[int, Sequence[Example]],
                 store: PersonalStore | None = None, log: Callable[[str], None] = print,
                 steps_scale: int = 1):
        self.am, self.method, self.cfg, self.fmt = am, method, cfg, fmt
        self.client = FedClient(am, method, cfg, pad_id, log=log)
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.store = store if store is not None else PersonalStore()
        self.steps_scale = steps_scale
        """The centralized reference trains one pooled client for as many steps as the round's sampled clients."""

    def steps(self, cid: int) -> int:
        return self.client.steps_for(len(self.train_rows[cid]), self.steps_scale)

    # ------------------------------------------------------------------ the global phase
    def global_phases(self, rnd: int, cids: Sequence[int], shared: Mapping,
                      on_done: Callable[[int, PhaseStats], None] | None = None) -> dict[int, ClientUpdate]:
        """Each client's global phase from the server's shared state; its personal store is updated.
        `on_done(cid, stats)` after each client's phase (progress reports).

        With `federation.lockstep` all clients train in one batched forward/backward (fedlora.lockstep).
        """
        self.store.at(rnd, "global")
        jobs = [(cid, rnd, shared, self.store.get(cid), self.train_rows[cid], self.steps(cid)) for cid in cids]
        if self.cfg.federation.lockstep:
            results = self.client.global_phases(jobs)
        else:
            results = (self.client.global_phase(*job) for job in jobs)
        updates = {}
        for cid, res in zip(cids, results):
            self.store.put(cid, res.personal)
            leaked = set(res.update.state) - set(shared)
            if leaked:  # the policy uploads shared components only; never let anything else out
                raise RuntimeError(f"refusing to send non-shared parameters to the server: {sorted(leaked)[:3]}")
            updates[cid] = res.update
            if on_done:
                on_done(cid, res.stats)
        return updates

    # ------------------------------------------------------------------ the local phase and local evaluation
    def local_round(self, rnd: int, cids_tasks: Mapping[int, LocalTask], shared: Mapping | None,
                    on_done: Callable[[int, PhaseStats], None] | None = None) -> dict[int, dict]:
        """Per client: its local phase on the NEW global state (if asked), then its local model's evaluation
        (and the global model's, if asked).
        `on_done(cid, stats)` after each client's local phase."""
        out: dict[int, dict] = {c: {} for c in cids_tasks}
        self.store.at(rnd, "local")
        train = [c for c, t in cids_tasks.items() if t.train and self.method.has_local_phase]
        if train:
            jobs = [(c, rnd, shared, self.store.get(c), self.train_rows[c]) for c in train]
            if self.cfg.federation.lockstep:
                results = self.client.local_phases(jobs)
            else:  # one by one, so that each is reported as it ends (the same results)
                results = (self.client.local_phase(*job) for job in jobs)
            for c, (personal, stats) in zip(train, results):
                self.store.put(c, personal)
                out[c].update({"local-loss": stats.loss, "local-steps": stats.steps, "local-tokens": stats.tokens})
                if on_done:
                    on_done(c, stats)
        settings = self.cfg.eval.at_round(rnd, self.cfg.federation.rounds)
        for c, task in cids_tasks.items():
            if task.base:
                out[c]["eval"] = self.evaluate_base(c)
                continue
            if task.evaluate_global:
                self.am.load_state(self.client.full_global_state(shared))
                out[c]["global-eval"] = self._evaluate(c, settings)
            if task.evaluate:
                self.am.load_state(self.local_state(c, shared))
                out[c]["eval"] = self._evaluate(c, settings)
        return out

    def local_state(self, cid: int, shared: Mapping) -> State:
        """The client's local model: the global state with its personal components."""
        return protocol.local_model_state(self.method, self.client.full_global_state(shared), self.store.get(cid))

    def evaluate_base(self, cid: int) -> dict:
        with self.am.model.disable_adapter():
            return self._evaluate(cid)

    def _evaluate(self, cid: int, e=None) -> dict:
        e = e or self.cfg.eval
        return evaluate(self.am, self.fmt, self.eval_rows[cid], e, e.max_examples_per_client).as_dict()
