"""Paired comparisons over seeds: the difference of each method from a reference on the same seed, its mean and
a Student-t 95 % interval, and the markdown table the study writes."""

from __future__ import annotations

import math

# (summary key, table heading, +1 where higher is better); the unseen-task columns only where runs have them (NI)
PAIRED_METRICS = (("global_loss", "global loss", -1), ("local_loss", "local loss", -1),
                  ("global_rouge_l", "global ROUGE-L", 1), ("local_rouge_l", "local ROUGE-L", 1),
                  ("unseen_loss", "unseen-task loss", -1), ("unseen_rouge_l", "unseen-task ROUGE-L", 1))
ONLY_WITH_DATA = {"unseen_loss", "unseen_rouge_l"}


def confidence_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean paired difference: mean ± t_{(1+level)/2, n-1} · s / √n (s with n − 1).

    None for fewer than 2 seeds (no spread to estimate).
    """
    import numpy as np
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return None
    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def paired_differences(by_label: dict[str, dict[int, dict]], reference: str) -> dict:
    """Per method: the per-seed difference to `reference` (same seed: same partition and test sets) of each
    metric, its mean, std and 95 % confidence interval over seeds, and on how many seeds the method was better
    (lower loss, higher ROUGE-L).

    Seeds change the partition and the test sets, which moves every method's numbers together; the paired
    difference removes that shared part, so it is the fair way to tell a method's effect from the seed spread.
    """
    import numpy as np

    out = {}
    ref = by_label[reference]
    for label, runs in by_label.items():
        if label == reference:
            continue
        entry = {}
        for key, _, sign in PAIRED_METRICS:
            diffs = [runs[s][key] - ref[s][key] for s in runs
                     if s in ref and runs[s].get(key) is not None and ref[s].get(key) is not None]
            if diffs:
                ci = confidence_interval(diffs)
                entry[key] = {"mean": float(np.mean(diffs)), "std": float(np.std(diffs)), "seeds": len(diffs),
                              "better": sum(1 for d in diffs if sign * d > 0), "per_seed": diffs,
                              "ci95": list(ci) if ci else None,
                              "significant": bool(ci and (ci[0] > 0 or ci[1] < 0))}
        out[label] = entry
    return out


def shown_metrics(entries) -> list[tuple[str, str]]:
    """(key, heading) of the columns a table of these paired entries shows: the four main metrics always, the
    unseen-task ones only where some entry has them (NI)."""
    entries = list(entries)
    return [(k, heading) for k, heading, _ in PAIRED_METRICS
            if k not in ONLY_WITH_DATA or any(k in entry for entry in entries)]


def paired_cell(e: dict | None) -> str:
    """One paired difference: mean [95 % interval] (seeds better/seeds), "n.s." where the interval holds 0."""
    if e is None:
        return "–"
    if e.get("ci95"):
        lo, hi = e["ci95"]
        return (f"{e['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] ({e['better']}/{e['seeds']})"
                + ("" if e["significant"] else " n.s."))
    return f"{e['mean']:+.4f} ({e['better']}/{e['seeds']})"


def paired_table(paired: dict, reference: str, n_seeds: int) -> str:
    columns = shown_metrics(paired.values())
    head = (f"Paired by seed against {reference} (method − {reference}: mean [95 % confidence interval] over seeds, "
            f"and on how many seeds the method was better; n.s. = the interval contains 0):\n\n"
            f"| method | {' | '.join(h for _, h in columns)} |\n|---|{'---|' * len(columns)}\n")
    lines = [f"| {label} | " + " | ".join(paired_cell(entry.get(k)) for k, _ in columns) + " |"
             for label, entry in paired.items()]
    return head + "\n".join(lines) + "\n"
