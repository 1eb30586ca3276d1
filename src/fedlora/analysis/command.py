"""`fedlora analyze sensitivity`: the paper's pilot study as a command (see `fedlora.analysis.pilot`)."""

from __future__ import annotations

import argparse
import math
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
                    "Instructions tasks), snapshot A and B every k steps, and write tables (per factor, layer "
                    "type, task group, both norm axes), the paper's two ratios and PNG plots.",
    )
    p.add_argument("--config", "-c", help="YAML config file (model, data, lora, train.lr/batch_size are used)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--groups", "-g", default=None,
                   help="comma-separated task groups: Dolly categories or NI task names "
                        "(default: the 4 largest categories; for NI 4 tasks from different categories)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per task group (default 40)")
    p.add_argument("--every", type=int, default=10, help="snapshot A and B every k steps (default 10)")
    p.add_argument("--out", "-o", default="runs/pilot", help="output directory (default runs/pilot)")
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
    parts += ["--steps", str(args.steps), "--every", str(args.every), "--out", args.out]
    return shlex.join(parts)


def _f(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def cmd_sensitivity(args: argparse.Namespace, console: Console) -> int:
    import torch

    from .. import results as res
    from ..config import load_config
    from ..model import load_base_model, load_tokenizer, pick_device, pick_dtype
    from .pilot import LOSS_WINDOW, load_group_examples, parse_groups, run_pilot, write_pilot_report
    from .sensitivity import _slug as slug
    from .sensitivity import measure_snapshots, write_report

    if args.steps < 1:
        raise UserError(f"--steps: must be at least 1 (got {args.steps})")
    if args.every < 1:
        raise UserError(f"--every: must be at least 1 (got {args.every})")
    cfg = load_config(args.config, args.set)
    groups = parse_groups(args.groups)
    group_examples = load_group_examples(cfg, groups, warn=lambda m: console.print(f"[yellow]{m}"))
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UserError(f"--out: {out} already exists and is not empty; choose another --out or pass --overwrite")
    console.print(f"pilot study: {len(group_examples)} task group(s) ({', '.join(group_examples)}), "
                  f"{args.steps} steps each, snapshots every {args.every}; lr {cfg.train.lr:g}, "
                  f"batch {cfg.train.batch_size}x{cfg.train.grad_accum}, LoRA r={cfg.lora.r} on "
                  f"{', '.join(cfg.lora.target_modules)}")
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    with console.status(f"loading model {cfg.model.name} ({device}, {dtype})"):
        tokenizer = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
        base_model = load_base_model(cfg.model.name, device, dtype, cfg.model.cache_dir)
    out = res.prepare_run_dir(out, args.overwrite)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = {}

        def on_start(group: str) -> None:
            bar["task"] = progress.add_task(group, total=args.steps, loss="-")

        def on_step(step: int, loss: float) -> None:
            progress.update(bar["task"], advance=1, loss=f"{loss:.3f}")
            if step % args.every == 0 and step < args.steps:  # a line per snapshot, also in logs
                group = progress.tasks[-1].description
                console.print(f"  {group}: step {step}/{args.steps}, loss {loss:.3f}, "
                              f"{progress.tasks[-1].elapsed or 0:.0f}s")

        def on_done(run) -> None:
            progress.remove_task(bar["task"])
            first, last = run.losses[:LOSS_WINDOW], run.losses[-LOSS_WINDOW:]
            console.print(f"{run.group}: {len(run.losses)} steps on {run.rows} rows, loss (mean of {LOSS_WINDOW} steps) "
                          f"{sum(first) / len(first):.3f} -> {sum(last) / len(last):.3f}, "
                          f"{len(run.snapshots)} snapshots, {run.seconds:.0f}s")
            # written at once, so that a run stopped later keeps the groups already done
            torch.save({"group": run.group, "snapshots": run.snapshots, "losses": run.losses},
                       out / f"snapshots_{slug(run.group)}.pt")
            write_report(measure_snapshots(run.snapshots, group=run.group), out, run.group)

        runs, _ = run_pilot(cfg, tokenizer, base_model, group_examples, steps=args.steps, every=args.every,
                            on_start=on_start, on_step=on_step, on_done=on_done)

    summary, paths = write_pilot_report(runs, out, command=_command_line(args))
    print()
    print("final step; paper: A-dir : B-dir ≈ 1.7, B-mag : A-mag ≈ 41")
    width = max(10, *(len(g) for g in summary["groups"]))
    cols = ("ΔD_A", "ΔD_B", "A:B dir", "ΔM_A", "ΔM_B", "B:A mag")
    print(f"{'task group':<{width}}  axis " + "".join(f"{c:>10}" for c in cols))
    rows = [(g, v["axes"]) for g, v in summary["groups"].items()] + [("all groups", summary["overall"])]
    for g, axes in rows:
        for axis, v in axes.items():
            vals = (v["delta_direction_A"], v["delta_direction_B"], v["a_dir_over_b_dir"],
                    v["delta_magnitude_A"], v["delta_magnitude_B"], v["b_mag_over_a_mag"])
            print(f"{g:<{width}}  {axis:<4} " + "".join(f"{_f(x):>10}" for x in vals))
    print()
    n_png = sum(p.suffix == ".png" for p in paths)
    console.print(f"written to {out}/: summary.md, summary.json, records.json, sensitivity_all_groups.md, and per "
                  f"group sensitivity_<group>.md, snapshots_<group>.pt (A and B at each snapshot) and {n_png} "
                  f"PNG plots")
    return 0
