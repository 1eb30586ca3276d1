"""One experiment end to end (load, partition, simulate, evaluate, write), shared by `run` and `compare`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .checkpoint import Checkpoint
from .config import Config
from .data.federated import FederatedData, build_federated_data, load_examples
from .model import load_base_model, load_tokenizer, pick_device, pick_dtype
from .rundir import run_engine
from .simulation import RoundRecord, Simulation


class Session:
    """The loaded pieces that several experiments can share: tokenizer and ONE base model."""

    def __init__(self, cfg: Config, console: Console):
        if cfg.model.threads:
            torch.set_num_threads(cfg.model.threads)
        self.cfg = cfg
        self.device = pick_device(cfg.model.device)
        self.dtype = pick_dtype(cfg.model.dtype, self.device)
        self.console = console
        self._model = None
        self._examples: dict[tuple, tuple] = {}
        self.base_evals: dict[str, dict] = {}
        """The base model's evaluation per `base_key`: computed once, shared by the methods of a comparison."""

    def load_model(self) -> None:
        """Load the tokenizer and the base model once (data is checked first, so bad data fails fast)."""
        if self._model is None:
            cfg = self.cfg
            with self.console.status(f"loading model {cfg.model.name} ({self.device}, {self.dtype})"):
                self.tokenizer = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
                self._model = load_base_model(cfg.model.name, self.device, self.dtype, cfg.model.cache_dir)

    @property
    def base_model(self):
        self.load_model()
        return self._model

    @base_model.setter
    def base_model(self, model) -> None:
        self._model = model

    def data(self, cfg: Config) -> FederatedData:
        key = (cfg.data.source, cfg.data.path, tuple(sorted(cfg.data.field_map.items())), cfg.data.tasks,
               cfg.data.max_instances_per_task, cfg.data.num_positive_examples, cfg.data.unseen_tasks, cfg.seed,
               cfg.federation.clients)
        if key not in self._examples:
            self._examples[key] = load_examples(cfg, warn=lambda m: self.console.print(f"[yellow]{m}"))
        examples, unseen = self._examples[key]
        return build_federated_data(cfg, examples, unseen)


def base_key(cfg: Config) -> str:
    """What the base model's evaluation depends on: model, data, partition (seed, clients), evaluation settings."""
    return json.dumps([cfg.model.name, cfg.model.dtype, dataclasses.asdict(cfg.data), cfg.seed,
                       cfg.federation.clients, dataclasses.asdict(cfg.eval)], sort_keys=True, default=str)


def check_lora_targets(model, targets: list[str]) -> None:
    """Every `lora.target_modules` entry must name modules of the model (PEFT's rule: the name or its last parts)."""
    from .config import _suggest
    from .errors import ConfigError

    names = [n for n, _ in model.named_modules()]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
            raise ConfigError(f"lora.target_modules: {t!r} matches no module of this model{_suggest(t, leaves)}")


def print_partition(console: Console, data: FederatedData) -> None:
    labels, rows = data.table()
    table = Table(title="training rows per client and label", show_lines=False)
    table.add_column("client")
    for lab in labels:
        table.add_column(lab[:14], justify="right")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    for c, row in enumerate(rows):
        table.add_row(str(c), *[str(v) for v in row], str(len(data.clients[c].train)), str(len(data.clients[c].test)))
    console.print(table)
    gt = sum(len(v) for v in data.global_test.values())
    line = f"global test set: {gt} rows over {len(data.global_test)} labels"
    if data.unseen_test:
        line += f"; unseen-task test set: {sum(len(v) for v in data.unseen_test.values())} rows over " \
                f"{len(data.unseen_test)} tasks ({', '.join(data.unseen_test)})"
    console.print(line)


def run_experiment(session: Session, cfg: Config, out_dir: Path, *, show_partition: bool = True,
                   on_round: Callable[[RoundRecord], None] | None = None, resume: Checkpoint | None = None) -> dict:
    """Run one method with one seed; write everything into out_dir; return the summary row.

    With `resume` (a checkpoint of this run directory, already checked against cfg and the data) the
    simulator's state, metrics.jsonl and the round counter are restored and the run continues after
    the checkpoint's round; a checkpoint is written every `output.checkpoint_every` rounds and after the last.
    """
    console = session.console
    data = session.data(cfg)
    if show_partition:
        print_partition(console, data)
    session.load_model()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        sim = Simulation(cfg, session.tokenizer, session.base_model, data,
                         log=lambda m: console.print(f"[yellow]{m}"), progress=lambda: progress.advance(task))
        per_round = sim.engine.steps_per_round()
        done = resume.round if resume else 0
        task = progress.add_task(f"{cfg.method} seed {cfg.seed}", total=cfg.federation.rounds * per_round,
                                 completed=done * per_round)
        try:
            key = base_key(cfg)
            row = run_engine(sim.engine, out_dir, data, resume=resume, on_round=on_round, am=sim.am,
                             say=lambda line: console.print(line, soft_wrap=True),
                             provenance={"device": str(session.device)}, base=session.base_evals.get(key))
            session.base_evals[key] = json.loads((out_dir / "results.json").read_text())["base_eval"]
            return row
        finally:
            session.base_model = sim.am.release()
