"""scripts/base_eval.py: the base model's losses on a config's test sets, before any training."""

import json
import math
import subprocess
import sys
from pathlib import Path

from conftest import DOLLY

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "base_eval.py"
SMALL = [f"data.path={DOLLY}", "max_rows=240", "clients=3", "max_length=64", "max_examples_per_client=4",
         "max_global_examples=8", "global_test_per_label=2", "eval.generate=false"]


def base_eval(*sets: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(SCRIPT), "--config", "configs/default.yaml"]
    for s in sets:
        argv += ["--set", s]
    return subprocess.run(argv, capture_output=True, text=True, cwd=SCRIPT.parents[1], timeout=600)


def test_base_losses_match_a_run_evaluated_before_training(tiny_dir):
    from rich.console import Console

    from fedlora.config import load_config
    from fedlora.runner import Session
    from fedlora.simulation import Simulation

    done = base_eval(f"model.name={tiny_dir}", *SMALL)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert math.isfinite(out["global"]["loss"]) and math.isfinite(out["local"]["loss"])
    # the same numbers from a FedLoRA-Optimizer simulation of that config, before round 1: its adapter is
    # also an exact no-op at init (B's magnitude starts at zero), so both must see the plain base model
    cfg = load_config(SCRIPT.parents[1] / "configs" / "default.yaml",
                      [f"model.name={tiny_dir}", *SMALL, "method=fedlora_opt"])
    session = Session(cfg, Console(quiet=True))
    data = session.data(cfg)
    session.load_model()
    ev = Simulation(cfg, session.tokenizer, session.base_model, data).evaluate()
    assert abs(ev["global"]["loss"] - out["global"]["loss"]) < 1e-4
    assert abs(ev["local"]["loss"] - out["local"]["loss"]) < 1e-4


def test_a_bad_setting_is_one_line(tiny_dir):
    done = base_eval(f"model.name={tiny_dir}", "federation.rounds=0")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "federation.rounds" in done.stderr
