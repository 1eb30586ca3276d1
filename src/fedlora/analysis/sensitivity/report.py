"""The pilot study's summary and report: the paper's two ratios at the final step (`summarize`), and the
Markdown tables and ΔD-against-ΔM plots written by `write_report`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .measures import AXES, MEASURE, PAPER_RATIOS


# ---------------------------------------------------------------------------------------------
# summary and report


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def _weighted(records: list[dict], field: str) -> float:
    total = sum(r["num_layers"] for r in records)
    return sum(r[field] * r["num_layers"] for r in records) / total if total else math.nan


def _factor_summary(records: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for factor in ("A", "B"):
        rs = [r for r in records if r["factor"] == factor]
        out[f"delta_direction_{factor}"] = _weighted(rs, "delta_direction")
        out[f"delta_magnitude_{factor}"] = _weighted(rs, "delta_magnitude")
        out[f"relative_delta_magnitude_{factor}"] = _weighted(rs, "relative_delta_magnitude")
    out["a_dir_over_b_dir"] = _ratio(out["delta_direction_A"], out["delta_direction_B"])
    out["b_mag_over_a_mag"] = _ratio(out["delta_magnitude_B"], out["delta_magnitude_A"])
    return out


def _groups(records: list[dict]) -> list[str]:
    return sorted({r.get("group", "") for r in records})


def summarize(records: list[dict], group: str | None = None) -> dict:
    """The paper's two ratios at the final step, per axis (and per layer type).

    Returns {"group", "step", "measure", "paper", "axes": {axis: values},
    "by_layer_type": {layer type: {axis: values}}}, where values hold delta_direction_A/B,
    delta_magnitude_A/B, relative_delta_magnitude_A/B, a_dir_over_b_dir = ΔD_A / ΔD_B and
    b_mag_over_a_mag = ΔM_B / ΔM_A (NaN when the denominator is 0). Over layer types the values
    are weighted by layer count, i.e. the mean over all layers.
    """
    if group is not None:
        records = [r for r in records if r.get("group", "") == group]
    elif len(_groups(records)) > 1:
        raise ValueError(f"records hold several groups {_groups(records)}; pass group=")
    if not records:
        raise ValueError(f"no records{'' if group is None else f' for group {group!r}'}")
    final = max(r["step"] for r in records)
    last = [r for r in records if r["step"] == final]
    axes = sorted({r["axis"] for r in last}, key=lambda a: AXES.index(a) if a in AXES else 99)
    layer_types = sorted({r["layer_type"] for r in last})
    return {
        "group": records[0].get("group", "") if group is None else group,
        "step": final,
        "measure": MEASURE,
        "paper": dict(PAPER_RATIOS),
        "axes": {a: _factor_summary([r for r in last if r["axis"] == a]) for a in axes},
        "by_layer_type": {
            lt: {a: _factor_summary([r for r in last if r["axis"] == a and r["layer_type"] == lt]) for a in axes}
            for lt in layer_types
        },
    }


def _f(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.4g}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "all"


def _markdown(records: list[dict], group_name: str) -> str:
    lines = [f"# Pilot study: change of LoRA's A and B in direction and magnitude — {group_name}", ""]
    lines += [f"Measure: {MEASURE}", ""]
    lines += [
        f"Paper: A-direction : B-direction ≈ {PAPER_RATIOS['a_dir_over_b_dir']}, "
        f"B-magnitude : A-magnitude ≈ {PAPER_RATIOS['b_mag_over_a_mag']:g} (axis not stated).",
        "",
        "## Ratios at the final step",
        "",
        "| task group | axis | step | ΔD_A | ΔD_B | A-dir : B-dir | ΔM_A | ΔM_B | B-mag : A-mag |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups = _groups(records)
    for g in groups:
        s = summarize(records, group=g)
        for axis, v in s["axes"].items():
            lines.append(
                f"| {g or '-'} | {axis} | {s['step']} | {_f(v['delta_direction_A'])} | {_f(v['delta_direction_B'])} "
                f"| {_f(v['a_dir_over_b_dir'])} | {_f(v['delta_magnitude_A'])} | {_f(v['delta_magnitude_B'])} "
                f"| {_f(v['b_mag_over_a_mag'])} |"
            )
    lines += [
        "",
        "## Final step, per factor and layer type",
        "",
        "| task group | factor | layer type | axis | step | ΔD | ΔM | relative ΔM | layers | ΔD reference step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        rs = [r for r in records if r.get("group", "") == g]
        final = max(r["step"] for r in rs)
        for r in sorted((r for r in rs if r["step"] == final), key=lambda r: (r["factor"], r["layer_type"], r["axis"])):
            lines.append(
                f"| {g or '-'} | {r['factor']} | {r['layer_type']} | {r['axis']} | {r['step']} "
                f"| {_f(r['delta_direction'])} | {_f(r['delta_magnitude'])} | {_f(r['relative_delta_magnitude'])} "
                f"| {r['num_layers']} | {r['reference_step']} |"
            )
    lines += [
        "",
        "## All steps (mean over all layers)",
        "",
        "| task group | step | factor | axis | ΔD | ΔM | relative ΔM |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        rs = [r for r in records if r.get("group", "") == g]
        keys = sorted({(r["step"], r["factor"], r["axis"]) for r in rs})
        for step, factor, axis in keys:
            sel = [r for r in rs if (r["step"], r["factor"], r["axis"]) == (step, factor, axis)]
            lines.append(
                f"| {g or '-'} | {step} | {factor} | {axis} | {_f(_weighted(sel, 'delta_direction'))} "
                f"| {_f(_weighted(sel, 'delta_magnitude'))} | {_f(_weighted(sel, 'relative_delta_magnitude'))} |"
            )
    return "\n".join(lines) + "\n"


def _plot(records: list[dict], axis: str, title: str, path: Path) -> None:
    """ΔD (x) against ΔM (y), one panel per factor, a point per (layer type, step), coloured by step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 2)
    steps = [r["step"] for r in records]
    vmin, vmax = min(steps), max(steps)
    markers = "os^Dv<>pP*Xh"
    layer_types = sorted({r["layer_type"] for r in records})
    scatter = None
    for ax, factor in zip(panels, ("A", "B")):
        for i, lt in enumerate(layer_types):
            rs = [r for r in records if r["factor"] == factor and r["layer_type"] == lt and r["axis"] == axis]
            if not rs:
                continue
            scatter = ax.scatter(
                [r["delta_direction"] for r in rs],
                [r["delta_magnitude"] for r in rs],
                c=[r["step"] for r in rs],
                cmap="viridis",
                vmin=vmin,
                vmax=vmax if vmax > vmin else vmin + 1,
                marker=markers[i % len(markers)],
                label=lt,
                edgecolors="black",
                linewidths=0.3,
            )
        ax.set_title(f"LoRA {factor} ({axis})")
        ax.set_xlabel("ΔD (mean 1 − cos)")
        ax.set_ylabel("ΔM (mean |Δ norm|)")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, title="layer type", title_fontsize=7)
    if scatter is not None:
        fig.colorbar(scatter, ax=list(panels), label="step")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def write_report(records: list[dict], out_dir: str | Path, group_name: str) -> list[Path]:
    """Write `sensitivity_<group>.md` (tables) and `sensitivity_<group>_<axis>.png` (one plot per
    axis) into `out_dir`; return their paths, the Markdown first."""
    if not records:
        raise ValueError("no records to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sensitivity_{_slug(group_name)}"
    md = out / f"{stem}.md"
    md.write_text(_markdown(records, group_name), encoding="utf-8")
    paths = [md]
    for axis in [a for a in AXES if any(r["axis"] == a for r in records)]:
        png = out / f"{stem}_{axis}.png"
        _plot(records, axis, f"{group_name}: LoRA factor change by step ({axis})", png)
        paths.append(png)
    return paths
