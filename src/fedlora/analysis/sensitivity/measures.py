"""The pilot study's measures on LoRA weights: per weight (ΔD, ΔM, relative ΔM along rows or columns) and over
a series of adapter snapshots (`measure_snapshots`, one record per step, factor, layer type and axis).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

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
