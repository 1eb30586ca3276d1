"""Magnitude/direction parametrization of a LoRA factor: W = diag(m) · D / ‖D‖ (rows) or D / ‖D‖ · diag(m) (cols).

Registered with `torch.nn.utils.parametrize` on PEFT's `lora_A`/`lora_B` weights, so PEFT keeps
injection, merging and forward; the two stored tensors (`original0` = direction, `original1` =
magnitude) become the trainable parameters. The direction is normalized in the forward pass, as
DoRA does, so the stored direction need not be unit.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Axis = Literal["rows", "cols"]
EPS = 1e-8


# Each function takes a [rows, cols] weight or a stack [..., rows, cols] of them (e.g. one per client).


def _dim(axis: Axis) -> int:
    """The dimension a norm runs over: a row's entries (axis="rows") or a column's (axis="cols")."""
    return -1 if axis == "rows" else -2


def vector_norms(weight: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Norm of each row (axis="rows") or each column (axis="cols")."""
    return weight.norm(dim=_dim(axis))


def unit(weight: torch.Tensor, axis: Axis) -> torch.Tensor:
    return weight / vector_norms(weight, axis).unsqueeze(_dim(axis)).clamp_min(EPS)


def compose(direction: torch.Tensor, magnitude: torch.Tensor, axis: Axis) -> torch.Tensor:
    return unit(direction, axis) * magnitude.unsqueeze(_dim(axis))


class MagnitudeDirection(nn.Module):
    """The parametrization module: forward(direction, magnitude) -> weight."""

    def __init__(self, axis: Axis):
        super().__init__()
        if axis not in ("rows", "cols"):
            raise ValueError(f"norm axis must be 'rows' or 'cols', got {axis!r}")
        self.axis = axis

    def forward(self, direction: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        return compose(direction, magnitude.to(direction.dtype), self.axis)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return weight.detach().clone(), vector_norms(weight.detach(), self.axis)


def scale(direction: torch.Tensor, gain: torch.Tensor, axis: Axis) -> torch.Tensor:
    """diag(g)·D (rows) or D·diag(g) (cols), D not normalized."""
    return direction * gain.unsqueeze(_dim(axis))


class GainDirection(MagnitudeDirection):
    """The `free` B of the magnitude/direction kind: W = diag(g) · D with D unnormalized, g a per-row gain.

    D then moves as a plain LoRA factor does (zero at init, so the adapter starts at ΔW = 0) and g (1 at init)
    is a relative scale of each row: a personal offset of g rescales the shared rows without turning them.
    """

    def forward(self, direction: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return scale(direction, gain.to(direction.dtype), self.axis)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.detach()
        return w.clone(), torch.ones_like(vector_norms(w, self.axis))
