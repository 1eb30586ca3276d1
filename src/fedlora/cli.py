"""The `fedlora` command: run, compare, methods (and more subcommands registered by other modules)."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from .errors import UserError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set rounds=5 or --set federation.clients=8 (repeatable)")
    p.add_argument("--out", "-o", help="run directory (default: output.dir from the config)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning (FedLoRA-Optimizer).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated experiment")
    _common(run)
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its last complete checkpoint, with its own config")
    run.add_argument("--force", action="store_true",
                     help="with --resume: continue even if --config/--set or the data differ from the run's")
    cmp_ = sub.add_parser("compare", help="run several methods (and seeds) on identical partitions")
    _common(cmp_)
    cmp_.add_argument("--methods", help="comma-separated method names (default: all)")
    cmp_.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's seed)")
    sub.add_parser("methods", help="list the available methods and their policies")
    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Subcommands living in other modules (analysis, Flower); each exposes `register(subparsers)`."""
    out = []
    for mod in ("fedlora.analysis.command", "fedlora.flower.command", "fedlora.study"):
        try:
            module = __import__(mod, fromlist=["register"])
        except ImportError:
            continue
        out.append(module.register)
    return out


def cmd_methods(args, console: Console) -> int:
    from .config import MethodConfig
    from .core.methods import METHODS

    for name, build in METHODS.items():
        m = build(MethodConfig())
        console.print(f"[bold]{name}[/] ({m.adapter}): {m.summary}")
        console.print(f"    global phase trains {sorted(m.global_train)}; shared {sorted(m.shared)}; "
                      f"personal {sorted(m.personal)}; local phase trains {sorted(m.local_train)}")
    return 0


def _load(args):
    from .config import load_config

    cfg = load_config(args.config, args.set)
    if args.out:
        cfg.output.dir = args.out
    if args.overwrite:
        cfg.output.overwrite = True
    return cfg


def cmd_run(args, console: Console) -> int:
    from . import results as res
    from .runner import Session, check_lora_targets, run_experiment

    if args.resume:
        return cmd_resume(args, console)
    if args.force:
        raise UserError("--force only applies to --resume RUN_DIR")
    cfg = _load(args)
    res.check_run_dir(cfg.output.dir, cfg.output.overwrite)
    session = Session(cfg, console)
    session.data(cfg)  # bad data fails here, before anything is written
    session.load_model()  # and a bad model path or target module, before an old run is replaced
    check_lora_targets(session.base_model, cfg.lora.target_modules)
    out = res.prepare_run_dir(cfg.output.dir, cfg.output.overwrite)
    row = run_experiment(session, cfg, out)
    print()
    print(res.results_table([row["base"], row]))
    console.print(f"results written to {out}/ (results.json, results.md, metrics.jsonl, curves.png, adapters/)",
                  soft_wrap=True)
    return 0


def cmd_resume(args, console: Console) -> int:
    """`fedlora run --resume RUN_DIR`: every check first, so a refused resume leaves RUN_DIR as it was."""
    from . import results as res
    from .checkpoint import CheckpointError, check_resume, open_for_resume
    from .config import load_config
    from .runner import Session, check_lora_targets, run_experiment

    run = Path(args.resume)
    if args.out:
        raise UserError("--resume continues in RUN_DIR itself; drop --out")
    if args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; use one or the other")
    ckpt, skipped, finished = open_for_resume(run, "--resume")
    if ckpt is not None and ckpt.state.get("runtime") == "flower":
        raise CheckpointError(f"--resume: {ckpt.path} was written by the Flower ServerApp; resume it there "
                              f"(flwr run ... --run-config \"resume=true out='{run}'\", see docs/deployment.md)")
    cfg = load_config(args.config or run / "config.yaml", args.set)
    cfg.output.dir, cfg.output.overwrite = str(run), False
    if check_resume(run, ckpt, finished, cfg, force=args.force, label="--resume",
                    force_hint="resume without --config/--set, or pass --force to continue with the new config"):
        print(f"{run}: the run already finished ({cfg.federation.rounds} rounds); nothing to do")
        return 0
    for name, why in skipped.items():
        console.print(f"[yellow]checkpoint {name} is incomplete ({why}); using {ckpt.path.name}")
    session = Session(cfg, console)
    data = session.data(cfg)
    if data.fingerprint != ckpt.fingerprint and not args.force:
        raise CheckpointError(f"--resume: the data differ from the run's (fingerprint {ckpt.fingerprint}, now "
                              f"{data.fingerprint}, data.path={cfg.data.path}); pass --force to continue anyway")
    session.load_model()
    check_lora_targets(session.base_model, cfg.lora.target_modules)
    row = run_experiment(session, cfg, run, resume=ckpt)
    print()
    print(res.results_table([row["base"], row]))
    console.print(f"results written to {run}/")
    return 0


def _aggregate_rows(rows: list[dict]) -> dict:
    import numpy as np

    out = {k: v for k, v in rows[0].items() if k != "base"}
    out["seeds"] = len(rows)
    for key in ("global_loss", "global_rouge_l", "local_loss", "local_rouge_l", "unseen_loss", "unseen_rouge_l",
                "bytes_up", "bytes_down", "wall_time", "steps", "tokens"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
        out[key + "_std"] = float(np.std(vals)) if vals else None
    for key in ("per_client_local_loss", "per_client_local_rouge_l"):
        per = [r[key] for r in rows]
        out[key + "_by_seed"] = per
        out[key] = [float(np.mean([p[c] for p in per if p[c] is not None] or [float("nan")]))
                    for c in range(len(per[0]))]
    return out


def cmd_compare(args, console: Console) -> int:
    from . import results as res
    from .core.methods import METHODS
    from .runner import Session, check_lora_targets, run_experiment

    cfg = _load(args)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r}; available: {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [cfg.seed]
    except ValueError:
        raise UserError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    res.check_run_dir(cfg.output.dir, cfg.output.overwrite)
    session = Session(cfg, console)
    session.data(cfg)  # bad data fails here, before anything is written
    session.load_model()
    check_lora_targets(session.base_model, cfg.lora.target_modules)
    out = res.prepare_run_dir(cfg.output.dir, cfg.output.overwrite)
    rows, histories, base_rows, per_method = [], {}, [], {}
    t0 = time.perf_counter()
    for m in methods:
        per_seed = []
        for i, seed in enumerate(seeds):
            c = copy.deepcopy(cfg)
            c.method, c.seed = m, seed
            run_dir = out / m / f"seed_{seed}"
            run_dir.mkdir(parents=True)
            console.rule(f"{m} (seed {seed})")
            per_seed.append(run_experiment(session, c, run_dir, show_partition=(m == methods[0] and i == 0)))
            if m == methods[0]:  # the same partitions and test sets for every method of a seed
                base_rows.append(per_seed[-1]["base"])
            if i == 0:
                import json

                histories[m] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        per_method[m] = per_seed
        rows.append(_aggregate_rows(per_seed))
        table_rows = [_aggregate_rows(base_rows), *rows]
        (out / "results.md").write_text(res.results_table(table_rows))
        res.write_json(out / "results.json", {"rows": table_rows, "seeds": seeds, "methods": methods})
    per_method[res.BASE_LABEL] = base_rows
    pairs = [(m, res.BASE_LABEL) for m in methods] + [(methods[0], m) for m in methods[1:]]
    table = res.results_table(table_rows) + "\n" + res.difference_table(per_method, pairs)
    note = ("Global = the model the server holds after aggregation (for a method that keeps a component only on "
            "the clients, that component at its initial value); local = each client's own model on its own test "
            "rows; base model = no adapter, the same test sets.\n")
    (out / "results.md").write_text(table + "\n" + note)
    res.plot_curves(histories, out / "curves.png")
    res.plot_per_client(table_rows, out / "per_client_local.png", seeds)
    print()
    print(table)
    print(note)
    console.print(f"total wall time {time.perf_counter() - t0:.0f}s; results in {out}/")
    return 0


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "methods": cmd_methods}


def quiet_library_warnings() -> None:
    """Hide library chatter that says nothing to a user of this tool."""
    import warnings

    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_warnings()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    try:
        return handler(args, console)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
