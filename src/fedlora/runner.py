"""One experiment end to end (load, partition, simulate, evaluate, write), shared by `run` and `compare`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import results as res
from .checkpoint import Checkpoint, CheckpointError, CheckpointStore, is_due
from .config import Config, dump_config
from .data.federated import FederatedData, build_federated_data, load_examples
from .model import load_base_model, load_tokenizer, pick_device, pick_dtype
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


def round_line(rec: RoundRecord) -> str:
    s = f"round {rec.round}: train loss {rec.train_loss:.4f}"
    if rec.local_phase_loss is not None:
        s += f", local-phase loss {rec.local_phase_loss:.4f}"
    s += f", {rec.examples} examples, up {rec.bytes_up / 1024:.1f} KiB/client, {rec.wall_time:.1f}s"
    if rec.eval:
        g, l = rec.eval["global"], rec.eval["local"]
        s += f" | global loss {g['loss']:.4f}"
        if g["rouge_l"] is not None:
            s += f" R-L {g['rouge_l']:.4f}"
        s += f" | local loss {l['loss']:.4f}"
        if l["rouge_l"] is not None:
            s += f" R-L {l['rouge_l']:.4f}"
    if rec.rejected:
        s += f" | rejected: {sorted(rec.rejected)}"
    return s


def run_experiment(session: Session, cfg: Config, out_dir: Path, *, show_partition: bool = True,
                   on_round: Callable[[RoundRecord], None] | None = None, resume: Checkpoint | None = None) -> dict:
    """Run one method with one seed; write everything into out_dir; return the summary row.

    With `resume` (a checkpoint of this run directory, already checked against cfg and the data) the
    simulator's state, metrics.jsonl and the round counter are restored and the run continues after
    the checkpoint's round; a checkpoint is written every `output.checkpoint_every` rounds and after the last.
    """
    console = session.console
    t0 = time.perf_counter()
    elapsed_before = resume.elapsed if resume else 0.0
    data = session.data(cfg)
    if show_partition:
        print_partition(console, data)
    session.load_model()
    metrics_path = out_dir / "metrics.jsonl"
    config_yaml = dump_config(cfg)
    store = CheckpointStore(out_dir)
    steps_per_round = max(1, int(round(cfg.federation.fraction * cfg.federation.clients)))
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        done = resume.round if resume else 0
        task = progress.add_task(f"{cfg.method} seed {cfg.seed}", total=cfg.federation.rounds * steps_per_round,
                                 completed=done * steps_per_round)
        sim = Simulation(cfg, session.tokenizer, session.base_model, data,
                         log=lambda m: console.print(f"[yellow]{m}"),
                         progress=lambda: progress.advance(task))
        try:
            lines: list[str] = []
            if resume is not None:  # restore first: a checkpoint that does not fit changes nothing on disk
                lines = list(resume.metrics)
                try:
                    sim.load_state_dict(resume.state, [RoundRecord.from_dict(json.loads(x)) for x in lines])
                except (ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"--resume: checkpoint {resume.path.name} does not fit this config: {e}") \
                        from None
                console.print(f"resuming after round {resume.round} of {cfg.federation.rounds} "
                              f"(checkpoint {resume.path.relative_to(out_dir)})")
                store.prune()  # leftovers of the crash: torn temporary checkpoints, a checkpoint too many
            res.atomic_write(out_dir / "config.yaml", config_yaml)
            res.atomic_write(metrics_path, "".join(lines))

            def record(rec: RoundRecord) -> None:
                line = json.dumps(rec.as_dict(), default=float) + "\n"
                lines.append(line)
                with open(metrics_path, "a") as f:
                    f.write(line)
                console.print(round_line(rec), soft_wrap=True)
                if is_due(rec.round, cfg.federation.rounds, cfg.output.checkpoint_every):
                    store.save(rec.round, sim.state_dict(), lines, config_yaml, data.fingerprint,
                               elapsed_before + time.perf_counter() - t0)
                if on_round:
                    on_round(rec)

            history = sim.run(on_round=record, start_round=done + 1)
            wall = elapsed_before + time.perf_counter() - t0
            hist = [h.as_dict() for h in history]
            row = res.summary_row(cfg.method, hist, sim.parameter_counts(), wall)
            if cfg.output.save_adapters:
                adapters = out_dir / "adapters"
                sim.am.export_peft(sim.server.global_state if not sim.method.personal else sim.global_eval_state(),
                                   adapters / "global")
                if sim.method.personal:
                    for cid in sorted(sim.personal):
                        sim.am.export_peft(sim.local_state(cid), adapters / "clients" / f"client_{cid}")
                    torch.save({c: s for c, s in sim.personal.items()}, out_dir / "personal_state.pt")
            (out_dir / "results.md").write_text(res.results_table([row]))
            if cfg.output.plots:
                res.plot_curves({cfg.method: hist}, out_dir / "curves.png")
            # written last: its presence means the run finished (see `fedlora run --resume`)
            res.write_json(out_dir / "results.json", {
                "summary": row, "history": hist, "method": sim.method.summary,
                "provenance": res.provenance(cfg, data, {"wall_time": wall, "device": str(session.device),
                                                         "resumed": bool(resume)}),
            })
        finally:
            session.base_model = sim.am.release()
    return row
