"""The base model's global and local response loss (and ROUGE-L) on a config's test sets, with no training.

Every run already evaluates the base model before round 1 (`RoundEngine.evaluate_base`: the "base model" row
of results.md / results.json); this script gives that row alone, without a run, for the same config and seed.

    .venv/bin/python scripts/base_eval.py --config configs/study/reference-probe.yaml [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from fedlora.cli import quiet_library_warnings
from fedlora.config import load_config
from fedlora.errors import UserError
from fedlora.runner import Session
from fedlora.simulation import Simulation


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    quiet_library_warnings()
    console = Console(stderr=True)
    try:
        out = base_losses(load_config(args.config, args.set), console)
    except UserError as e:  # bad config, data or model path: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"config": args.config, "set": args.set, **out}, indent=2))
    return 0


def base_losses(cfg, console: Console) -> dict:
    session = Session(cfg, console)
    data = session.data(cfg)
    session.load_model()
    ev = Simulation(cfg, session.tokenizer, session.base_model, data).engine.evaluate_base()
    out = {"seed": cfg.seed}
    for part in ("global", "local", "unseen"):
        if part in ev:
            out[part] = {"loss": ev[part]["loss"], "rouge_l": ev[part]["rouge_l"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
