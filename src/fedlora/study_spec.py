"""A study spec: reading and checking it, and what its method entries mean.

A method entry is `fedit` or {label, method, set, tuned_as}; a tuned experiment runs each entry at the winning
values of its tuning entry (see `tuning_key`). Checked before any run starts, so a bad spec fails with one line.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import ConfigError
from .tuning import check_tuning, tuned_entry


ORDERS = ("methods_first", "seeds_first")  # an experiment's `order`: see run_order


def load_spec(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study spec not found: {p}")
    try:
        spec = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"study spec {p} is not valid YAML") from None
    if not isinstance(spec.get("experiments"), dict) or not spec["experiments"]:
        raise ConfigError(f"study spec {p}: needs a non-empty 'experiments' mapping")
    for name, exp in spec["experiments"].items():
        for key in ("config", "methods"):
            if key not in exp:
                raise ConfigError(f"study spec {p}: experiment '{name}' has no '{key}'")
        if exp.get("order", ORDERS[0]) not in ORDERS:
            raise ConfigError(f"study spec {p}: experiment '{name}': order must be one of {', '.join(ORDERS)}, "
                              f"not {exp['order']!r}")
    if spec.get("tuning") is not None:
        check_tuning(spec["tuning"], f"study spec {p}")
    return spec


def run_order(exp: dict, entries: list, seeds: list[int]) -> list[tuple[str, list[str], int]]:
    """The experiment's runs in the order processes take them: every seed of a method before the next method
    (`order: methods_first`, the default), or every method at a seed before the next seed (`seeds_first`: in a
    long experiment, the first seed's comparison is complete long before the last method's seeds are)."""
    if exp.get("order", "methods_first") == "seeds_first":
        return [(label, extra, seed) for seed in seeds for label, extra in entries]
    return [(label, extra, seed) for label, extra in entries for seed in seeds]


def check_entries(plans: list, tuning: dict | None, spec_path: str) -> None:
    """Every method entry of every experiment builds a valid config, a tuned one with its tuning entry's fixed
    overrides (the winner's learning rates cannot make a config invalid): a bad ablation fails now, with one line,
    not hours into the study."""
    from .config import load_config

    for name, exp, sets, _, entries in plans:
        for entry, (label, extra) in zip(exp["methods"], entries):
            fixed: list[str] = []
            tuned_as = entry.get("tuned_as") if isinstance(entry, dict) else None
            if tuned_as is not None and not (exp.get("tuned") and tuning and tuned_as in tuning["methods"]):
                raise ConfigError(f"study spec {spec_path}: experiment '{name}', {label}: tuned_as: {tuned_as!r} is "
                                  f"not an entry of this experiment's tuning")
            if exp.get("tuned") and tuning:
                key = tuning_key(entry, tuning["methods"])
                if key in tuning["methods"]:
                    fixed = tuned_entry(tuning, key)[1]
            try:
                load_config(exp["config"], sets + extra[:1] + fixed + extra[1:])
            except ConfigError as e:
                raise ConfigError(f"study spec {spec_path}: experiment '{name}', {label}: {e}") from None


def tuning_key(entry, names) -> str:
    """The tuning entry an experiment's method entry takes its values from: the one it names with `tuned_as` (an
    ablation of a second reading), else the one named like its label (a second reading, e.g. fedlora_joint), else
    its method's."""
    label, extra = method_entry(entry)
    if isinstance(entry, dict) and "tuned_as" in entry:
        return entry["tuned_as"]
    return label if label in names else extra[0].split("=", 1)[1]


def tuned_method_entry(entry, winners: dict[str, dict], experiment: str) -> tuple[str, list[str]]:
    """A method entry of a tuned experiment: the winning overrides of its tuning entry (`tuning_key`), then the
    entry's own (an ablation)."""
    label, extra = method_entry(entry)
    method = tuning_key(entry, winners)
    if method not in winners:
        raise ConfigError(f"study spec: experiment '{experiment}' runs {method}, which the tuning does not tune")
    return label, list(winners[method]["sets"]) + extra[1:]


def method_entry(entry) -> tuple[str, list[str]]:
    """`fedit` or {label: ..., method: ..., set: [...], tuned_as: ...} for a variant of a method (`tuned_as`: the
    tuning entry whose winner it starts from, when that is not its label's or its method's)."""
    if isinstance(entry, str):
        return entry, [f"method={entry}"]
    if not isinstance(entry, dict) or "method" not in entry:
        raise ConfigError(f"study spec: a method entry must be a name or a mapping with 'method', got {entry!r}")
    return entry.get("label", entry["method"]), [f"method={entry['method']}"] + list(entry.get("set", []))
