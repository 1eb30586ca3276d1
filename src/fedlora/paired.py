"""Paired comparisons over seeds: the difference of each method from a reference on the same seed, its mean and
a Student-t 95 % interval, and the markdown table the study writes."""

from __future__ import annotations

import math

PAIRED_METRICS = (("global_loss", -1), ("local_loss", -1), ("global_rouge_l", 1), ("local_rouge_l", 1),
                  ("unseen_loss", -1), ("unseen_rouge_l", 1))  # (summary key, +1 where higher is better)
HEADINGS = {"global_loss": "global loss", "local_loss": "local loss", "global_rouge_l": "global ROUGE-L",
            "local_rouge_l": "local ROUGE-L", "unseen_loss": "unseen-task loss",
            "unseen_rouge_l": "unseen-task ROUGE-L"}
ALWAYS_SHOWN = 4  # the first four columns, also where empty; the unseen-task ones only where some run has them


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
        for key, sign in PAIRED_METRICS:
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


def paired_table(paired: dict, reference: str, n_seeds: int) -> str:
    keys = [k for i, (k, _) in enumerate(PAIRED_METRICS)
            if i < ALWAYS_SHOWN or any(k in entry for entry in paired.values())]
    head = (f"Paired by seed against {reference} (method − {reference}: mean [95 % confidence interval] over seeds, "
            f"and on how many seeds the method was better; n.s. = the interval contains 0):\n\n"
            f"| method | {' | '.join(HEADINGS[k] for k in keys)} |\n|---|{'---|' * len(keys)}\n")
    lines = []
    for label, entry in paired.items():
        cells = []
        for key in keys:
            e = entry.get(key)
            if e is None:
                cells.append("–")
            elif e.get("ci95"):
                lo, hi = e["ci95"]
                cells.append(f"{e['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] ({e['better']}/{e['seeds']})"
                             + ("" if e["significant"] else " n.s."))
            else:
                cells.append(f"{e['mean']:+.4f} ({e['better']}/{e['seeds']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"
