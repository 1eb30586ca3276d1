"""The pilot study's measures: how much LoRA's A and B change in direction and in magnitude.

Each factor is split into vectors along an axis ("rows": each row is a vector, "cols": each
column is). Following DoRA's weight-decomposition analysis, between a reference v_0 and a later
v_t of the same vector:

- direction change   ΔD = mean over vectors of (1 - cos(v_t, v_0))
- magnitude change   ΔM = mean over vectors of | ||v_t|| - ||v_0|| |
- relative magnitude     mean over vectors of | ||v_t|| - ||v_0|| | / (||v_0|| + eps)

The paper reports A-direction : B-direction ≈ 1.7 and B-magnitude : A-magnitude ≈ 41 without
naming the axis; `summarize` gives both ratios for both axes.

`measures` computes the records, `report` summarizes and writes them; both are re-exported here.
"""

from .measures import (
    AXES,
    EPS,
    MEASURE,
    PAPER_RATIOS,
    decompose,
    direction_change,
    magnitude_change,
    measure_snapshots,
    parse_lora_name,
    relative_magnitude_change,
)
from .report import _slug, summarize, write_report

__all__ = [
    "AXES", "EPS", "MEASURE", "PAPER_RATIOS", "decompose", "direction_change", "magnitude_change",
    "measure_snapshots", "parse_lora_name", "relative_magnitude_change", "summarize", "write_report",
]
