"""Equal tuning by construction: every method gets the same number of validation runs, in stages.

The `tuning` block of a study spec (configs/study/fair.yaml):

    tuning:
      name: tune                                  # its directory under the study's --out
      config: configs/study/fair-dolly.yaml
      set: [eval.split=validation, eval.generate=false]   # tuning-only overrides (never in a winner)
      seed: 0
      objective: [global_loss, local_loss]        # the mean of these on validation; lower is better
      budget: 8                                   # runs per method; every method must list exactly this many
      methods: {fedit: [], fedlora_opt: [method_options.local_lr_mult=1], ...}   # fixed overrides per method
      # a second reading of one method, tuned on its own budget: {method: fedlora_opt, set: [...]}
      stages:
        - {name: lr, all: [[train.lr=3.0e-4], [train.lr=1.0e-3], ...]}
        - {name: local, methods: {fedit: [[train.lr=*0.5], ...], fedlora_opt: [[train.personal_lr=*10], ...]}}

A stage's candidates apply on top of the best run so far of that method (over all its earlier stages), so stage
k + 1 of a method starts once its stage k is finished. `key=*f` is relative: f times the key's value in the best
run so far (`train.personal_lr` unset means `train.lr`). The best run over all stages is the method's winner; the
study's test experiments that say `tuned: <name>` run each method with its winner's overrides. Nothing here reads
the test split: the tuning config must evaluate on `validation`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

FALLBACK = {"train.personal_lr": "train.lr"}


@dataclass(frozen=True)
class TuningRun:
    method: str
    stage: str
    label: str
    sets: tuple[str, ...]
    """The method's fixed overrides plus the candidate's (absolute values): what a winner passes on."""

    def run_dir(self, root: Path, seed: int) -> Path:
        return root / self.method / self.label / f"seed_{seed}"


def tuned_entry(t: dict, name: str) -> tuple[str, list[str]]:
    """(method, fixed overrides) of the tuning's entry `name`: a method with a list of overrides, or another name
    (a second reading of a method, e.g. fedlora_joint) with `{method: M, set: [...]}`."""
    entry = t["methods"][name]
    if isinstance(entry, dict):
        return entry.get("method", name), list(entry.get("set") or [])
    return name, list(entry or [])


def check_tuning(t: dict, where: str) -> None:
    """Equal budgets by construction: one clear line for a spec that gives some method more or fewer runs."""
    for key in ("name", "config", "methods", "stages", "budget"):
        if key not in t:
            raise ConfigError(f"{where}: tuning has no '{key}'")
    split = [s for s in t.get("set", []) if s.replace(" ", "").startswith("eval.split=")]
    if split != ["eval.split=validation"]:
        raise ConfigError(f"{where}: tuning must set eval.split=validation (it never looks at the test split)")
    for name in t["methods"]:
        entry = t["methods"][name]
        if isinstance(entry, dict) and (set(entry) - {"method", "set"} or not isinstance(entry.get("set", []), list)):
            raise ConfigError(f"{where}: tuning entry {name!r} must be a list of overrides or {{method: M, set: [...]}}")
        count = 0
        for stage in t["stages"]:
            cands = stage.get("all", (stage.get("methods") or {}).get(name))
            if cands is None:
                raise ConfigError(f"{where}: tuning stage '{stage.get('name')}' has no candidates for {name}")
            count += len(cands)
        if count != t["budget"]:
            raise ConfigError(f"{where}: tuning gives {name} {count} runs; the budget is {t['budget']} for every "
                              "method")


def objective(summary: dict, keys: list[str]) -> float:
    """The mean of the summary's `keys` (lower is better); a diverged or missing value is +inf."""
    vals = [summary.get(k) for k in keys]
    if any(v is None or not math.isfinite(v) for v in vals):
        return math.inf
    return sum(vals) / len(vals)


def _value(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    if obj is None and key in FALLBACK:
        return _value(cfg, FALLBACK[key])
    return obj


def _resolve(candidate: list[str], base: dict[str, str], load, where: str) -> dict[str, str]:
    """The candidate's overrides as absolute `key: value` on top of `base` (relative values read from base)."""
    out = dict(base)
    cfg = None
    for item in candidate:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ConfigError(f"{where}: tuning candidate {item!r} is not KEY=VALUE")
        if value.startswith("*"):
            if "." not in key:
                raise ConfigError(f"{where}: relative value in {item!r} needs the full key (e.g. train.lr)")
            cfg = cfg or load([f"{k}={v}" for k, v in base.items()])
            try:
                value = str(float(value[1:]) * float(_value(cfg, key)))
            except (AttributeError, TypeError, ValueError):
                raise ConfigError(f"{where}: cannot scale {key} in {item!r}") from None
        out[key] = _canonical(value)
    return out


def _canonical(value: str) -> str:
    """One spelling per number (1.0e-3 and 0.001 name the same run directory); other values as written."""
    try:
        int(value)
        return value
    except ValueError:
        pass
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


def _label(sets: dict[str, str], fixed: int) -> str:
    """A directory name from the tuned overrides (the fixed ones are the same for all of a method's runs)."""
    items = list(sets.items())[fixed:]
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in items) or "default"


def _finished(run: TuningRun, root: Path, seed: int) -> dict | None:
    path = run.run_dir(root, seed) / "results.json"
    return json.loads(path.read_text())["summary"] if path.is_file() else None


def plan(t: dict, root: Path, load, where: str) -> tuple[list[TuningRun], dict[str, dict]]:
    """(runs to do now, winners of the methods whose stages are all finished).

    `load(sets)` builds a config (for relative values). A method's next stage is planned only once all runs of
    its current stage have results, so this is called again after each run.
    """
    seed = int(t.get("seed", 0))
    keys = list(t.get("objective", ["global_loss", "local_loss"]))
    todo, winners = [], {}
    for name in t["methods"]:
        method, fixed = tuned_entry(t, name)
        base = {"method": method}
        base.update(_resolve(fixed, {}, load, where))
        best: tuple[float, TuningRun, dict] | None = None
        pending = False
        for stage in t["stages"]:
            start = dict(s.split("=", 1) for s in best[1].sets) if best else dict(base)
            runs = []
            for cand in stage.get("all", (stage.get("methods") or {}).get(name)):
                sets = _resolve(list(cand), start, load, where)
                runs.append(TuningRun(name, stage["name"], _label(sets, len(base)),
                                      tuple(f"{k}={v}" for k, v in sets.items())))
            done = [(run, _finished(run, root, seed)) for run in runs]
            missing = [run for run, s in done if s is None]
            if missing:
                todo.extend(missing)
                pending = True
                break
            for run, s in done:
                score = objective(s, keys)
                if best is None or score < best[0]:
                    best = (score, run, s)
        if not pending and best is not None:
            winners[name] = {"sets": list(best[1].sets), "label": best[1].label, "stage": best[1].stage,
                             "objective": best[0]}
    return todo, winners


def tuning_table(t: dict, root: Path, winners: dict[str, dict]) -> tuple[str, dict]:
    """Every tuning run of every method with its objective, the winner marked (markdown, and the JSON record)."""
    seed = int(t.get("seed", 0))
    keys = list(t.get("objective", ["global_loss", "local_loss"]))
    lines = [f"Tuning on the validation split (seed {seed}; objective: mean of {', '.join(keys)}, lower is better; "
             f"{t['budget']} runs per method){'' if len(winners) == len(t['methods']) else '; IN PROGRESS'}\n",
             "| method | run | global loss | local loss | objective | |", "|---|---|---|---|---|---|"]
    record = {"budget": t["budget"], "objective": keys, "seed": seed, "winners": winners, "runs": {},
              "planned": t["budget"] * len(t["methods"]), "finished": 0, "complete": len(winners) == len(t["methods"])}
    for name in t["methods"]:
        runs = sorted(p.parent for p in (root / name).glob(f"*/seed_{seed}/results.json"))
        for run_dir in runs:
            s = json.loads((run_dir / "results.json").read_text())["summary"]
            label = run_dir.parent.name
            score = objective(s, keys)
            win = winners.get(name, {}).get("label") == label
            record["runs"].setdefault(name, {})[label] = {"global_loss": s.get("global_loss"),
                                                         "local_loss": s.get("local_loss"), "objective": score}
            record["finished"] += 1
            lines.append(f"| {name} | {label} | {s.get('global_loss', math.nan):.4f} | "
                         f"{s.get('local_loss', math.nan):.4f} | {score:.4f} | {'**winner**' if win else ''} |")
    return "\n".join(lines) + "\n", record
