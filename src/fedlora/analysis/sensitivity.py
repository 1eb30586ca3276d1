"""The pilot study's measures: how much LoRA's A and B change in direction and in magnitude.

Each factor is split into vectors along an axis ("rows": each row is a vector, "cols": each
column is). Following DoRA's weight-decomposition analysis, between a reference v_0 and a later
v_t of the same vector:

- direction change   ΔD = mean over vectors of (1 - cos(v_t, v_0))
- magnitude change   ΔM = mean over vectors of | ||v_t|| - ||v_0|| |
- relative magnitude     mean over vectors of | ||v_t|| - ||v_0|| | / (||v_0|| + eps)

The paper reports A-direction : B-direction ≈ 1.7 and B-magnitude : A-magnitude ≈ 41 without
naming the axis; `summarize` gives both ratios for both axes.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

EPS = 1e-12
AXES = ("rows", "cols")
PAPER_RATIOS = {"a_dir_over_b_dir": 1.7, "b_mag_over_a_mag": 41.0}

MEASURE = (
    "ΔD = mean over vectors of (1 - cos(v_t, v_ref)); ΔM = mean over vectors of |‖v_t‖ - ‖v_0‖|; "
    "relative ΔM = mean of |‖v_t‖ - ‖v_ref‖| / (‖v_ref‖ + eps); vectors are the rows or the columns "
    "of lora_A.weight [r, d_in] and lora_B.weight [d_out, r]; each value is averaged over the layers "
    "of a type (and over layer types weighted by layer count). v_0 is the first snapshot; v_ref is v_0 "
    "for A, and for B (all zeros at step 0) the first non-zero snapshot, so ΔM_B is the mean norm."
)

_LORA_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


# ---------------------------------------------------------------------------------------------
# the measures on one weight


def _check_axis(axis: str) -> int:
    """The dimension reduced over to get one norm per vector."""
    if axis == "rows":
        return 1
    if axis == "cols":
        return 0
    raise ValueError(f"axis must be 'rows' or 'cols', got {axis!r}")


def decompose(weight: Tensor, axis: str, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """(magnitude, direction) of a 2-D weight: weight = magnitude (broadcast) * direction.

    axis "rows": magnitude has shape [out], direction has unit rows. axis "cols": magnitude has
    shape [in], direction has unit columns. A zero vector gets magnitude 0 and direction 0 (the
    norm is clamped to eps), never NaN.
    """
    dim = _check_axis(axis)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    magnitude = w.norm(dim=dim)
    direction = w / magnitude.clamp_min(eps).unsqueeze(dim)
    return magnitude, direction


def _check_pair(w0: Tensor, wt: Tensor) -> None:
    if w0.shape != wt.shape:
        raise ValueError(f"shapes differ: {tuple(w0.shape)} vs {tuple(wt.shape)}")


def direction_change(w0: Tensor, wt: Tensor, axis: str, eps: float = EPS) -> float:
    """Mean over vectors of 1 - cos(v_t, v_0).

    A vector that is zero (norm <= eps) in either weight has no direction and is left out of the
    mean; if no vector is left, the result is NaN.
    """
    _check_pair(w0, wt)
    dim = _check_axis(axis)
    m0, d0 = decompose(w0, axis, eps)
    mt, dt = decompose(wt, axis, eps)
    cos = (d0 * dt).sum(dim=dim).clamp(-1.0, 1.0)
    defined = (m0 > eps) & (mt > eps)
    if not bool(defined.any()):
        return math.nan
    return float((1.0 - cos[defined]).mean())


def magnitude_change(w0: Tensor, wt: Tensor, axis: str, eps: float = EPS) -> float:
    """Mean over vectors of | ||v_t|| - ||v_0|| |."""
    _check_pair(w0, wt)
    m0, _ = decompose(w0, axis, eps)
    mt, _ = decompose(wt, axis, eps)
    return float((mt - m0).abs().mean())


def relative_magnitude_change(w0: Tensor, wt: Tensor, axis: str, eps: float = EPS) -> float:
    """Mean over vectors of | ||v_t|| - ||v_0|| | / (||v_0|| + eps)."""
    _check_pair(w0, wt)
    m0, _ = decompose(w0, axis, eps)
    mt, _ = decompose(wt, axis, eps)
    return float(((mt - m0).abs() / (m0 + eps)).mean())


# ---------------------------------------------------------------------------------------------
# snapshots of a LoRA adapter over training


def parse_lora_name(name: str) -> tuple[str, str, str] | None:
    """(module path, factor "A"/"B", layer type) of a LoRA weight name, or None for other names.

    Accepts PEFT's in-memory names (`...q_proj.lora_A.default.weight`) and saved-adapter names
    (`...q_proj.lora_A.weight`).
    """
    m = _LORA_NAME.match(name)
    if m is None:
        return None
    module = m.group("module")
    return module, m.group("factor"), module.rsplit(".", 1)[-1]


def _is_zero(t: Tensor, eps: float) -> bool:
    return bool(t.detach().abs().max() <= eps) if t.numel() else True


def _b_reference(
    name: str, series: list[tuple[int, Tensor]], b_reference_step: int | None, eps: float
) -> tuple[int, Tensor] | None:
    if b_reference_step is not None:
        for step, t in series:
            if step == b_reference_step:
                return step, t
        raise ValueError(f"b_reference_step {b_reference_step} is not a snapshot step")
    if not _is_zero(series[0][1], eps):
        return series[0]
    for step, t in series:
        if not _is_zero(t, eps):
            return step, t
    return None  # B never moved from zero


def measure_snapshots(
    snapshots: list[tuple[int, dict[str, Tensor]]],
    *,
    axes: tuple[str, ...] = AXES,
    b_reference_step: int | None = None,
    group: str = "",
    eps: float = EPS,
) -> list[dict]:
    """Per (step, factor, layer type, axis): ΔD, ΔM and relative ΔM, averaged over layers.

    `snapshots` are (step, {param name: tensor}); the smallest step is the initialization and
    every snapshot must hold the same LoRA weights (other names are ignored). A is measured
    against its first snapshot. LoRA's B starts at all zeros, so its direction is undefined at
    step 0: B's direction and relative magnitude are measured against the first non-zero snapshot
    (or the snapshot at `b_reference_step` when given), while B's magnitude change uses the true
    initial norm 0, so ΔM_B is B's mean vector norm. B snapshots that are still all zeros report
    ΔD = 0 and relative ΔM = 0 (nothing has moved yet), never NaN.

    Each record: group, step, factor, layer_type, axis, delta_direction, delta_magnitude,
    relative_delta_magnitude, num_layers, reference_step (the reference for ΔD; None if B never
    left zero).
    """
    if not snapshots:
        raise ValueError("no snapshots to measure")
    for axis in axes:
        _check_axis(axis)
    ordered = sorted(snapshots, key=lambda s: s[0])
    steps = [s for s, _ in ordered]
    if len(set(steps)) != len(steps):
        raise ValueError(f"duplicate snapshot steps: {steps}")

    names = {n: parse_lora_name(n) for n in ordered[0][1]}
    names = {n: p for n, p in names.items() if p is not None}
    if not names:
        raise ValueError("the first snapshot holds no LoRA weights (names ending in lora_A/lora_B ... weight)")
    for step, params in ordered[1:]:
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"snapshot at step {step} lacks {missing[0]} ({len(missing)} LoRA weights missing)")

    # (step, factor, layer type, axis) -> lists of per-layer values
    acc: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ref_steps: dict[tuple, set] = defaultdict(set)
    for name, (_, factor, layer_type) in sorted(names.items()):
        series = [(step, params[name]) for step, params in ordered]
        init = series[0][1]
        ref = series[0] if factor == "A" else _b_reference(name, series, b_reference_step, eps)
        for step, wt in series:
            moved = not _is_zero(wt, eps)
            for axis in axes:
                key = (step, factor, layer_type, axis)
                acc[key]["dm"].append(magnitude_change(init, wt, axis, eps))
                if ref is None or not moved:
                    dd, rel = 0.0, 0.0
                else:
                    dd = direction_change(ref[1], wt, axis, eps)
                    dd = 0.0 if math.isnan(dd) else dd
                    rel = relative_magnitude_change(ref[1], wt, axis, eps)
                acc[key]["dd"].append(dd)
                acc[key]["rel"].append(rel)
                ref_steps[key].add(None if ref is None else ref[0])

    records = []
    for key in sorted(acc, key=lambda k: (k[0], k[1], k[2], k[3])):
        step, factor, layer_type, axis = key
        vals = acc[key]
        refs = ref_steps[key]
        records.append(
            {
                "group": group,
                "step": step,
                "factor": factor,
                "layer_type": layer_type,
                "axis": axis,
                "delta_direction": sum(vals["dd"]) / len(vals["dd"]),
                "delta_magnitude": sum(vals["dm"]) / len(vals["dm"]),
                "relative_delta_magnitude": sum(vals["rel"]) / len(vals["rel"]),
                "num_layers": len(vals["dd"]),
                "reference_step": refs.pop() if len(refs) == 1 else sorted(refs, key=str),
            }
        )
    return records


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
