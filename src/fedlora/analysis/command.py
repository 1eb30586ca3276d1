"""`fedlora analyze sensitivity`: the paper's pilot study as a command (see `fedlora.analysis.pilot`)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import UserError


def register(subparsers) -> None:
    analyze = subparsers.add_parser("analyze", help="analyses of LoRA training (the paper's pilot study)")
    sub = analyze.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    p = sub.add_parser(
        "sensitivity",
        help="fine-tune LoRA on several task groups and measure how A and B change in direction and magnitude",
        description="Fine-tune a fresh plain LoRA separately on each task group (Dolly categories or Natural "
                    "Instructions tasks) for each seed, snapshot A and B every k steps, and report both readings "
                    "of sensitivity: how much each factor's direction and magnitude change during training, and "
                    "how much the held-out loss responds to a matched direction-only or magnitude-only "
                    "perturbation of each factor. Writes tables, the paper's two ratios (mean ± std over seeds) "
                    "and PNG plots. Rerun with the same --out to resume.",
    )
    p.add_argument("--config", "-c", help="YAML config file (model, data, lora, train.lr/batch_size are used)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--groups", "-g", default=None,
                   help="comma-separated task groups: Dolly categories or NI task names "
                        "(default: the 4 largest categories; for NI 4 tasks from different categories)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per task group (default 40)")
    p.add_argument("--every", type=int, default=10, help="snapshot A and B every k steps (default 10)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, each a fresh LoRA init and data order (default: the config's seed)")
    p.add_argument("--perturb-at", default="final", metavar="{final,all,none}",
                   help="measure the loss response to a direction-only / magnitude-only perturbation of each factor "
                        "at the final snapshot (default), at every snapshot, or not at all")
    p.add_argument("--rho", type=float, default=0.1,
                   help="perturbation size: every vector moves by rho * its norm, ||dW||/||W|| = rho (default 0.1)")
    p.add_argument("--draws", type=int, default=4, help="random perturbation draws per measurement (default 4)")
    p.add_argument("--heldout", type=int, default=16,
                   help="rows per task group held out of training for the loss response (default 16)")
    p.add_argument("--out", "-o", default="runs/pilot",
                   help="output directory (default runs/pilot); rerun with the same setup to resume it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(handler=cmd_sensitivity)


def _command_line(args) -> str:
    parts = ["fedlora", "analyze", "sensitivity"]
    if args.config:
        parts += ["--config", args.config]
    for item in args.set:
        parts += ["--set", item]
    if args.groups:
        parts += ["--groups", args.groups]
    parts += ["--steps", str(args.steps), "--every", str(args.every)]
    if args.seeds:
        parts += ["--seeds", args.seeds]
    parts += ["--perturb-at", args.perturb_at]
    if args.perturb_at != "none":
        parts += ["--rho", f"{args.rho:g}", "--draws", str(args.draws), "--heldout", str(args.heldout)]
    return shlex.join(parts + ["--out", args.out])


def _perturb_spec(args):
    from .pilot import PerturbSpec

    if args.perturb_at not in ("final", "all", "none"):
        raise UserError(f"--perturb-at: one of final, all, none (got {args.perturb_at!r})")
    if not 0 < args.rho < 1:
        raise UserError(f"--rho: must be in (0, 1) (got {args.rho:g})")
    if args.draws < 1:
        raise UserError(f"--draws: must be at least 1 (got {args.draws})")
    if args.heldout < 1:
        raise UserError(f"--heldout: must be at least 1 (got {args.heldout})")
    return None if args.perturb_at == "none" else PerturbSpec(args.heldout, args.rho, args.draws, args.perturb_at)


def cmd_sensitivity(args: argparse.Namespace, console: Console) -> int:
    import dataclasses

    import torch

    from ..config import load_config
    from ..model import load_base_model, load_tokenizer, pick_device, pick_dtype
    from .pilot import LOSS_WINDOW, load_group_examples, parse_groups, run_pilot, split_heldout, write_pilot_report
    from .seeds import (done_groups, load_group, main_table, open_out, parse_seeds, save_group, seed_values,
                        setup_of, write_seeds_report)
    from .sensitivity import measure_snapshots, write_report

    if args.steps < 1:
        raise UserError(f"--steps: must be at least 1 (got {args.steps})")
    if args.every < 1:
        raise UserError(f"--every: must be at least 1 (got {args.every})")
    spec = _perturb_spec(args)
    cfg = load_config(args.config, args.set)
    seeds = parse_seeds(args.seeds) or [cfg.seed]
    groups = parse_groups(args.groups)
    group_examples = load_group_examples(cfg, groups, warn=lambda m: console.print(f"[yellow]{m}"))
    for g, ex in group_examples.items():
        split_heldout(ex, spec.heldout if spec else 0, g)  # a group too small is refused before any work
    setup = setup_of(cfg, steps=args.steps, every=args.every, perturb=dataclasses.asdict(spec) if spec else None)
    out = Path(args.out)
    resuming = open_out(out, setup, args.overwrite, create=False)
    console.print(f"pilot study: {len(group_examples)} task group(s) ({', '.join(group_examples)}), seed(s) "
                  f"{', '.join(map(str, seeds))}, {args.steps} steps each, snapshots every {args.every}; lr "
                  f"{cfg.train.lr:g}, batch {cfg.train.batch_size}x{cfg.train.grad_accum}, LoRA r={cfg.lora.r} on "
                  f"{', '.join(cfg.lora.target_modules)}" + (f"; resuming {out}" if resuming else ""))
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    with console.status(f"loading model {cfg.model.name} ({device}, {dtype})"):
        tokenizer = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
        base_model = load_base_model(cfg.model.name, device, dtype, cfg.model.cache_dir)
    open_out(out, setup, args.overwrite, create=True)
    command = _command_line(args)

    per_seed = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = {}
        for seed in seeds:
            sdir = out / f"seed_{seed}"
            done = done_groups(sdir, group_examples)
            if done:
                console.print(f"seed {seed}: {', '.join(done)} already done, skipped")

            def on_start(group: str, seed=seed) -> None:
                bar["task"] = progress.add_task(f"seed {seed} {group}", total=args.steps, loss="-")

            def on_step(step: int, loss: float) -> None:
                progress.update(bar["task"], advance=1, loss=f"{loss:.3f}")
                if step % args.every == 0 and step < args.steps:  # a line per snapshot, also in logs
                    console.print(f"  {progress.tasks[-1].description}: step {step}/{args.steps}, loss {loss:.3f}, "
                                  f"{progress.tasks[-1].elapsed or 0:.0f}s")

            def on_done(run, sdir=sdir) -> None:
                progress.remove_task(bar["task"])
                first, last = run.losses[:LOSS_WINDOW], run.losses[-LOSS_WINDOW:]
                console.print(f"seed {run.seed} {run.group}: {len(run.losses)} steps on {run.rows} rows, loss (mean "
                              f"of {LOSS_WINDOW} steps) {sum(first) / len(first):.3f} -> {sum(last) / len(last):.3f}"
                              f", {len(run.snapshots)} snapshots, {run.seconds:.0f}s")
                save_group(run, sdir)  # at once: a run stopped later keeps (and skips) the groups already done
                write_report(measure_snapshots(run.snapshots, group=run.group), sdir, run.group)

            new, base_model = run_pilot(dataclasses.replace(cfg, seed=seed), tokenizer, base_model, group_examples,
                                        steps=args.steps, every=args.every, perturb=spec, done=set(done),
                                        on_start=on_start, on_step=on_step, on_done=on_done)
            runs = {r.group: r for r in new}
            runs = [runs[g] if g in runs else load_group(sdir, g) for g in group_examples]
            summary, _ = write_pilot_report(runs, sdir, command=command)
            per_seed[seed] = seed_values(summary)

    agg = write_seeds_report(out, per_seed, list(group_examples), spec.rho if spec else None, command)
    print()
    print(f"final step, all groups; mean ± std over {len(seeds)} seed(s)")
    for line in main_table(agg, spec.rho if spec else None):
        print(line)
    print()
    console.print(f"written to {out}/: summary.md and summary.json over seeds; per seed seed_<s>/ with its "
                  "summary, tables, plots, snapshots_<group>.pt and run_<group>.json (rerun to resume)")
    return 0
