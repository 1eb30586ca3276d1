"""One experiment end to end (load, partition, simulate, evaluate, write), shared by `run` and `compare`."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .checkpoint import Checkpoint
from .config import Config
from .data.federated import FederatedData, build_federated_data, load_examples
from .engine import sample_clients
from .model import load_base_model, load_tokenizer, needs_conversion, pick_device, pick_dtype
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
            what = f"loading model {cfg.model.name} ({self.device}, {self.dtype})"
            if needs_conversion(cfg.model.name, cfg.model.cache_dir):
                what += "; converting the embedded GGUF model first (once, about a minute)"
            if not self.console.is_terminal:  # a log gets the line the terminal's spinner shows
                self.console.print(what, markup=False, highlight=False, soft_wrap=True)
            with self.console.status(what):
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
    print_table(console, "training rows per client and label", ["client", *labels, "train", "test"],
                [[c, *row, len(data.clients[c].train), len(data.clients[c].test)] for c, row in enumerate(rows)])
    gt = sum(len(v) for v in data.global_test.values())
    line = f"global test set: {gt} rows over {len(data.global_test)} labels"
    if data.unseen_test:
        line += f"; unseen-task test set: {sum(len(v) for v in data.unseen_test.values())} rows over " \
                f"{len(data.unseen_test)} tasks ({', '.join(data.unseen_test)})"
    console.print(line, soft_wrap=True)


def print_table(console: Console, title: str, headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A table whose headers are never cut: a rich table where it fits the console's width, else plain Markdown
    (a narrow terminal or a log, whose width rich takes as 80 columns); numbers right-aligned."""
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(str(h), justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*map(str, row))
    probe = Console(file=io.StringIO(), width=100_000, color_system=None)
    with probe.capture() as cap:
        probe.print(table)
    if max(cell_len(line.rstrip()) for line in cap.get().splitlines()) <= console.width:
        console.print(table)
        return
    lines = [title, "", "| " + " | ".join(map(str, headers)) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|",
             *("| " + " | ".join(map(str, row)) + " |" for row in rows), ""]
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def phase_name(method, phase: str) -> str:
    """What progress calls a phase: the joint pipeline's one phase serves the global and the local optimizer."""
    return "joint" if phase == "global" and method.joint_personal else phase


class RoundProgress:
    """Progress inside the rounds, fed by the in-process transport after each client's phase.

    In a terminal: a live bar (round, clients done in the phase, steps done of the run, ETA). Elsewhere (a log
    file, a pipe): one plain line per client phase (global, local; joint in the joint pipeline), e.g. `round 2
    client 3 global phase: 4 steps, loss 2.3100, 12.3s (24/48 steps, about 1m20s left)`. The ETA is the run's
    own pace: steps left at the seconds per step so far, counted from the start of the first phase (evaluation
    included, the base model's excluded).
    """

    def __init__(self, console: Console, sim: Simulation, start_round: int):
        cfg, m = sim.cfg, sim.method
        self.console, self.rounds, self.method = console, cfg.federation.rounds, m
        self.plan: dict[int, tuple[int, int]] = {}
        """round -> (clients in each phase, steps of the round)."""
        for r in range(start_round, self.rounds + 1):
            sampled = [0] if m.pooled else sample_clients(len(sim.data.clients), cfg.federation.fraction, cfg.seed, r)
            local = cfg.train.personal_steps * len(sampled) if m.has_local_phase else 0
            self.plan[r] = (len(sampled), sum(sim.host.steps(c) for c in sampled) + local)
        self.total = sum(steps for _, steps in self.plan.values())
        self.done, self.clients, self.t0 = 0, 0, None
        self.bar: Progress | None = None
        if console.is_terminal:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                TextColumn("steps"), TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
                                console=console, transient=True)  # fits 80 columns
            self.task = self.bar.add_task(f"round {start_round}/{self.rounds}", total=self.total, eta="-")

    def __enter__(self) -> RoundProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def eta(self) -> str:
        if not self.done or self.t0 is None:
            return "-"
        left = (time.perf_counter() - self.t0) / self.done * max(0, self.total - self.done)
        return f"{int(left // 60)}m{int(left % 60):02d}s" if left >= 60 else f"{left:.0f}s"

    def __call__(self, rnd: int, cid: int, phase: str, stats, seconds: float) -> None:
        """One client finished one phase (`transport.Progress`)."""
        phase = phase_name(self.method, phase)
        if self.t0 is None:
            self.t0 = time.perf_counter() - seconds
        self.done += stats.steps
        per_phase = self.plan.get(rnd, (1, 0))[0]
        self.clients = self.clients % per_phase + 1
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, eta=self.eta(),
                            description=f"round {rnd}/{self.rounds}: {phase} phase, {self.clients}/{per_phase} clients")
        else:
            steps = f"{stats.steps} step" + ("s" if stats.steps != 1 else "")
            self.console.print(f"round {rnd} client {cid} {phase} phase: {steps}, loss {stats.loss:.4f}, "
                               f"{seconds:.1f}s ({self.done}/{self.total} steps, about {self.eta()} left)",
                               markup=False, highlight=False, soft_wrap=True)

    def round_done(self, rnd: int) -> None:
        """Back on the plan after a round (a failed or diverged client does fewer steps than planned)."""
        self.done = sum(steps for r, (_, steps) in self.plan.items() if r <= rnd)
        self.clients = 0
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, eta=self.eta(),
                            description=f"round {min(rnd + 1, self.rounds)}/{self.rounds}")


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
    sim = Simulation(cfg, session.tokenizer, session.base_model, data, log=lambda m: console.print(f"[yellow]{m}"))
    progress = RoundProgress(console, sim, resume.round + 1 if resume else 1)
    sim.transport.progress = progress

    def round_done(rec: RoundRecord) -> None:
        progress.round_done(rec.round)
        if on_round:
            on_round(rec)

    try:
        with progress:
            key = base_key(cfg)
            row = run_engine(sim.engine, out_dir, data, resume=resume, on_round=round_done, am=sim.am,
                             say=lambda line: console.print(line, soft_wrap=True),
                             provenance={"device": str(session.device), "dtype": str(session.dtype)},
                             base=session.base_evals.get(key))
        session.base_evals[key] = sim.engine.base_eval
        return row
    finally:
        session.base_model = sim.am.release()
