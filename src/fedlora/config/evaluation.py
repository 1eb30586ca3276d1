"""The config sections of what a run measures (`eval`) and what it writes (`output`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from .section import _Section


@dataclass
class EvalConfig(_Section):
    SECTION = "eval"

    every: int = 1
    """Evaluate every k rounds (and always after the last; 0: only after the last)."""
    max_examples_per_client: int = 16
    max_global_examples: int = 64
    generate: bool = True
    max_gen_examples: int = 8
    """Examples per client (and per global set) scored by ROUGE-L of greedy generations."""
    generate_every: int = 1
    """Generate (ROUGE-L) at every k-th round's evaluation and always at the last (0: the last only); the other
    evaluations score the loss alone. Generating is most of an evaluation's cost, and loss curves need none."""
    max_new_tokens: int = 32
    batch_size: int = 8
    """Rows per batch when scoring the loss."""
    gen_batch_size: int = 32
    """Prompts per batch when generating. Each decoded token reads every weight once per batch, so on a CPU a
    larger batch costs less per token (0.57x the CPU time of batch 8 at 32, with the same generations:
    benchmarks/eval_cost.py, docs/performance.md)."""
    split: Literal["test", "validation"] = "test"
    """`validation` evaluates on the validation rows carved from the clients' training data (for tuning;
    needs data.validation_fraction > 0): local = each client's own, global = all clients' pooled by label."""

    def validate(self) -> None:
        self._positive("every", allow_zero=True)
        self._positive("max_examples_per_client")
        self._positive("max_global_examples")
        self._positive("max_gen_examples", allow_zero=True)
        self._positive("generate_every", allow_zero=True)
        self._positive("max_new_tokens")
        self._positive("batch_size")
        self._positive("gen_batch_size")

    def at_round(self, rnd: int, rounds: int) -> EvalConfig:
        """The settings of round `rnd`'s evaluation: without generation unless `generate_every` says so."""
        due = rnd == rounds or (self.generate_every > 0 and rnd % self.generate_every == 0)
        return self if due or not self.generate else dataclasses.replace(self, generate=False)


@dataclass
class OutputConfig(_Section):
    SECTION = "output"

    dir: str = "runs/default"
    overwrite: bool = False
    save_adapters: bool = True
    plots: bool = True
    checkpoint_every: int = 1
    """Checkpoint every k rounds (and always after the last; 0: only after the last). See docs/reliability.md."""

    def validate(self) -> None:
        self._positive("checkpoint_every", allow_zero=True)
