"""The run directory: resolved config, metrics.jsonl, results.json, a Markdown table, PNG curves, adapters."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .paired import paired_cell, paired_differences, shown_metrics


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "flwr", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file, fsync, rename: a reader never sees a torn file. The temporary name is unique,
    so two processes writing the same file (two `fedlora study` processes) do not take each other's."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # what open() would give (mkstemp's is 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_run_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty run directory unless asked to overwrite (checked before any work)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output.dir: {p} exists and is not a directory")
    for parent in p.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"output.dir: {p} cannot be created: {parent} is a file")
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise UserError(f"output.dir: {p} already holds a run; choose another --out or pass --overwrite")
    return p


def prepare_run_dir(path: str | Path, overwrite: bool) -> Path:
    """Create the run directory (after check_run_dir and the data checks passed)."""
    p = check_run_dir(path, overwrite)
    if p.exists() and any(p.iterdir()):
        shutil.rmtree(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output.dir: cannot create {p}: {e.strerror}") from None
    return p


def provenance(cfg, data, extra: dict | None = None) -> dict:
    return {"method": cfg.method, "seed": cfg.seed, "model": cfg.model.name, "data_path": cfg.data.path,
            "data_fingerprint": data.fingerprint, "versions": _versions(), **(extra or {})}


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(x, digits=4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def results_table(rows: list[dict]) -> str:
    """Markdown table; each row: method, global/local loss and ROUGE-L (mean ± std where several seeds)."""
    head = ("| method | seeds | global loss | global ROUGE-L | local loss | local ROUGE-L | steps/client-round | "
            "tokens/client-round | "
            "up B/client-round | down B/client-round | trainable | communicated | wall s |")
    unseen = any(r.get("unseen_loss") is not None for r in rows)  # Natural Instructions: unseen tasks
    if unseen:
        head = head.replace(" local loss |", " unseen-task loss | unseen-task ROUGE-L | local loss |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        def ms(key):
            m, s = r.get(key), r.get(key + "_std")
            if m is None:
                return "–"
            return f"{m:.4f} ± {s:.4f}" if s is not None and r.get("seeds", 1) > 1 else f"{m:.4f}"
        lines.append(
            f"| {r['method']} | {r.get('seeds', 1)} | {ms('global_loss')} | {ms('global_rouge_l')} | "
            + (f"{ms('unseen_loss')} | {ms('unseen_rouge_l')} | " if unseen else "") +
            f"{ms('local_loss')} | {ms('local_rouge_l')} | {_fmt(r.get('steps'), 1)} | {_fmt(r.get('tokens'), 0)} | "
            f"{r.get('bytes_up', 0):,.0f} | "
            f"{r.get('bytes_down', 0):,.0f} | {r.get('trainable', 0):,} | {r.get('communicated', 0):,} | "
            f"{r.get('wall_time', 0):.1f} |"
        )
    return "\n".join(lines) + "\n"


def summary_row(method: str, history: list[dict], counts: dict, wall: float) -> dict:
    last = [h for h in history if h.get("eval")][-1]["eval"]
    rounds = len(history)
    return {
        "method": method, "seeds": 1,
        "global_loss": last["global"]["loss"], "global_rouge_l": last["global"]["rouge_l"],
        "local_loss": last["local"]["loss"], "local_rouge_l": last["local"]["rouge_l"],
        "unseen_loss": last.get("unseen", {}).get("loss"), "unseen_rouge_l": last.get("unseen", {}).get("rouge_l"),
        "steps": _mean([h.get("steps") for h in history]),
        "tokens": _mean([h.get("tokens") for h in history]),
        "bytes_up": sum(h["bytes_up"] for h in history) / max(1, rounds),
        "bytes_down": sum(h["bytes_down"] for h in history) / max(1, rounds),
        **counts, "wall_time": wall,
        "per_client_local_loss": [c["loss"] for c in last["local"]["per_client"]],
        "per_client_local_rouge_l": [c["rouge_l"] for c in last["local"]["per_client"]],
    }


def privacy_summary(history: list[dict]) -> dict | None:
    """The differential privacy of a run (its last round's `privacy` record: ε so far), None when DP was off."""
    rows = [h["privacy"] for h in history if h.get("privacy")]
    return dict(rows[-1], rounds=len(rows)) if rows else None


def privacy_line(p: dict) -> str:
    """One line under the results table: the (ε, δ) guarantee and the mechanism behind it."""
    return (f"\nDifferential privacy ({p['mode']}, client-level): ε = {p['epsilon']:.3f} at δ = {p['delta']:g} after "
            f"{p['releases']} release(s); noise multiplier z = {p['noise_multiplier']:g}, clipping norm "
            f"C = {p['clipping_norm']:g}, accounting {p['accounting']}"
            + (f" (sampling rate q = {p['sample_rate']:.3g})" if p["accounting"] != "none" else "") + ".\n")


BASE_LABEL = "base model"
PILOT_DONE = "pilot.finished"
"""A study's marker file: its pilot study is finished."""
PARTIAL = "partial"
"""Name of an unfinished study experiment's tables (partial.md / partial.json): only its methods whose seeds are
all finished, so every number is complete for the methods it shows."""
_PANELS = {(0, 0): ("global", "loss"), (0, 1): ("local", "loss"), (1, 0): ("global", "rouge_l"),
           (1, 1): ("local", "rouge_l")}


def base_row(base_eval: dict) -> dict:
    """The reference row: the untrained base model on the same global and local sets (nothing trained, nothing sent)."""
    return {
        "method": BASE_LABEL, "seeds": 1,
        "global_loss": base_eval["global"]["loss"], "global_rouge_l": base_eval["global"]["rouge_l"],
        "local_loss": base_eval["local"]["loss"], "local_rouge_l": base_eval["local"]["rouge_l"],
        "unseen_loss": base_eval.get("unseen", {}).get("loss"),
        "unseen_rouge_l": base_eval.get("unseen", {}).get("rouge_l"),
        "bytes_up": 0, "bytes_down": 0, "trainable": 0, "communicated": 0, "personal": 0,
        "wall_time": base_eval.get("wall_time", 0.0),
        "per_client_local_loss": [c["loss"] for c in base_eval["local"]["per_client"]],
        "per_client_local_rouge_l": [c["rouge_l"] for c in base_eval["local"]["per_client"]],
    }


def plot_curves(histories: dict[str, list[dict]], out: Path, base: dict | None = None) -> Path | None:
    """Global and local loss / ROUGE-L over rounds, one line per method; the base model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, 2)
    for name, hist in histories.items():
        ev = [h for h in hist if h.get("eval")]
        for (i, j), (scope, key) in _PANELS.items():
            points = [(h["round"], h["eval"][scope][key]) for h in ev if h["eval"][scope][key] is not None]
            if not points:  # e.g. ROUGE-L is not generated at every evaluation (eval.generate_every)
                continue
            axes[i][j].plot(*zip(*points), marker="o", label=name)
            axes[i][j].set_title(f"{scope} {key.replace('_', '-')}")
            axes[i][j].set_xlabel("round")
    if base is not None:
        for (i, j), (scope, key) in _PANELS.items():
            if base[scope].get(key) is not None:
                axes[i][j].axhline(base[scope][key], color="grey", linestyle="--", label=BASE_LABEL)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def plot_per_client(rows: list[dict], out: Path, seeds: list[int] | None = None) -> Path:
    """Each client's local loss (its personalized model on its own test split), per method: one dot per client
    and seed (colour = seed), the method's mean as a bar. Seeds change the partition, so client c of one seed is
    not client c of another; the dots show the spread over clients, the bar the level."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6, 1.1 * len(rows) + 2), 4.2))
    ax = fig.subplots(1, 1)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    values = []
    for i, r in enumerate(rows):
        per_seed = r.get("per_client_local_loss_by_seed") or [r["per_client_local_loss"]]
        for s, vals in enumerate(per_seed):
            vals = [v for v in vals if v is not None]
            values += vals
            offsets = [i + (c - (len(vals) - 1) / 2) * 0.5 / max(1, len(vals)) for c in range(len(vals))]
            ax.scatter(offsets, vals, s=14, color=colours[s % len(colours)],
                       label=(f"seed {seeds[s]}" if seeds and s < len(seeds) else f"seed #{s + 1}")
                       if i == 0 and len(per_seed) > 1 else None, zorder=3)
        mean = [v for vals in per_seed for v in vals if v is not None]
        if mean:
            m = sum(mean) / len(mean)
            ax.hlines(m, i - 0.35, i + 0.35, color="black", linewidth=2, zorder=4)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["method"] for r in rows], rotation=30, ha="right", fontsize=8)
    if values:
        lo, hi = min(values), max(values)
        pad = 0.05 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel("local response loss per client (lower is better)")
    ax.set_title("per-client local loss; black line: mean over clients and seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if any(len(r.get("per_client_local_loss_by_seed") or []) > 1 for r in rows):
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=float) + "\n")


def difference_table(per_seed: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> str:
    """Markdown table of paired differences `a − b` per metric, over the seeds both were run on (same partitions),
    as the study's paired tables give them (`paired.py`): mean [95 % interval] (seeds on which `a` was better).

    Loss: negative means `a` is better; ROUGE-L: positive means `a` is better.
    """
    diffs = {(a, b): paired_differences({a: dict(enumerate(per_seed[a])), b: dict(enumerate(per_seed[b]))}, b)[a]
             for a, b in pairs}
    columns = shown_metrics(diffs.values())
    lines = ["| difference | " + " | ".join(f"Δ {label}" for _, label in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {a} − {b} | " + " | ".join(paired_cell(entry.get(k)) for k, _ in columns) + " |"
              for (a, b), entry in diffs.items()]
    return "\n".join(lines) + "\n\nΔ loss < 0 and Δ ROUGE-L > 0 favour the first model of the pair.\n"
