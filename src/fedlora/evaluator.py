"""The server's evaluation of the global model, and the summary of the clients' local evaluations.

Global: the adapter state the server holds, on the global test set (each category/task weighted
equally: the per-label losses are averaged) and, for Natural Instructions, on unseen tasks.
Local: each client evaluates its own local model on its own held-out rows (`ClientHost`); here the
per-client results are only summarized (mean over the clients that reported).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .adapters import AdapterModel
from .core.components import State
from .data.federated import ClientData, FederatedData
from .data.prompts import PromptFormatter
from .evaluate import evaluate_groups


class GlobalEvaluator:
    def __init__(self, am: AdapterModel, fmt: PromptFormatter, data: FederatedData, cfg):
        self.am, self.fmt, self.data, self.cfg = am, fmt, data, cfg

    def has_sets(self) -> bool:
        """Whether the server holds global test rows (clients with their own data: none, unless a file is given)."""
        return bool(self.global_sets())

    def global_sets(self) -> dict:
        """The global test set by label; on `eval.split=validation`, the clients' validation rows pooled by label."""
        if self.cfg.eval.split == "test":
            return self.data.global_test
        pooled: dict = {}
        for c in self.data.clients:
            for e in c.validation:
                pooled.setdefault(e.label, []).append(e)
        return dict(sorted(pooled.items()))

    def evaluate(self, state: State, rnd: int | None = None) -> dict:
        """{"global": ..., ["unseen": ...]} of the model with this adapter state (after round `rnd`: with the
        round's settings, `EvalConfig.at_round`)."""
        self.am.load_state(state)
        return self._all(self.cfg.eval if rnd is None else self.cfg.eval.at_round(rnd, self.cfg.federation.rounds))

    def evaluate_base(self) -> dict:
        """The same sets on the base model, its adapter disabled."""
        with self.am.model.disable_adapter():
            return self._all(self.cfg.eval)

    def _all(self, e) -> dict:
        out = {"global": self._labelled(self.global_sets(), e)}
        if self.data.unseen_test and e.split == "test":
            out["unseen"] = self._labelled(self.data.unseen_test, e)
        return out

    def _labelled(self, sets: Mapping, e) -> dict:
        """Per-label evaluation, then the unweighted mean over labels (each category/task counts equally)."""
        per = max(1, e.max_global_examples // max(1, len(sets)))
        results = evaluate_groups(self.am, self.fmt, sets, e, per)
        rouges = [r.rouge_l for r in results.values() if r.rouge_l is not None]
        return {
            "loss": float(np.mean([r.loss for r in results.values()])),
            "rouge_l": float(np.mean(rouges)) if rouges else None,
            "per_label": {lab: r.as_dict() for lab, r in results.items()},
        }


def eval_rows(client: ClientData, split: str) -> list:
    """A client's held-out rows for its local evaluation: its test split, or its validation split when tuning."""
    return client.validation if split == "validation" else client.test


def local_summary(per_client: Mapping[int, dict | None], num_clients: int) -> dict:
    """Mean over the clients that reported; a client that did not is listed as missing."""
    rows = []
    for c in range(num_clients):
        r = per_client.get(c)
        rows.append(dict(r) if r is not None else
                    {"loss": None, "rouge_l": None, "examples": 0, "tokens": 0, "missing": True})
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    rouges = [r["rouge_l"] for r in rows if r["rouge_l"] is not None]
    return {"loss": float(np.mean(losses)) if losses else float("nan"),
            "rouge_l": float(np.mean(rouges)) if rouges else None,
            "per_client": rows}


def federated_summary(per_client: Mapping[int, dict | None], num_clients: int) -> dict:
    """The global model scored by the clients on their own held-out rows (federated evaluation):

        loss = sum_c n_c * loss_c / sum_c n_c      (n_c: rows client c evaluated; ROUGE-L likewise)

    with each client's numbers in `per_client` (a client that did not report is listed as missing).
    """
    rows = local_summary(per_client, num_clients)["per_client"]
    done = [r for r in rows if r["loss"] is not None and r["examples"] > 0]
    n = sum(r["examples"] for r in done)
    rouged = [r for r in done if r["rouge_l"] is not None]
    return {"loss": sum(r["loss"] * r["examples"] for r in done) / n if n else float("nan"),
            "rouge_l": (sum(r["rouge_l"] * r["examples"] for r in rouged) / sum(r["examples"] for r in rouged)
                        if rouged else None),
            "examples": n, "clients": len(done), "per_client": rows,
            "note": "federated evaluation: each client scores the global model on its own held-out rows; "
                    "example-weighted mean"}
