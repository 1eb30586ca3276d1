"""Magnitude/direction LoRA: A = diag(A_M)·A_D and B = diag(B_M)·B_D (with "rows"; "cols" scales columns).

B_D is a unit direction (`b_direction="unit"`, the paper read literally and this class's default) or a free
factor with B_M a gain (`"free"`, the default of `method_options.b_direction`, which the fair study's tuning chose).

Installed with `torch.nn.utils.parametrize` over PEFT's lora_A/lora_B weights (`core.magdir`), so PEFT keeps
injection and forward; the stored direction (`original0`) and magnitude (`original1`) are the parameters.
Exported by multiplying the parts back into plain lora_A / lora_B weights.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from ..core.components import MAGDIR
from ..core.magdir import Axis, GainDirection, MagnitudeDirection, compose, scale, unit
from .base import AdapterKind, lora_layers


class MagDirKind(AdapterKind):
    naming = MAGDIR
    lockstep = True

    def __init__(self, lora_cfg, *, norm_axis_a: Axis = "rows", norm_axis_b: Axis = "rows",
                 b_mag_init: float = 0.0, b_dir_init_norm: float = 1.0, b_direction: str = "unit", **other):
        """`b_mag_init`: B's initial magnitudes. `b_dir_init_norm`: the stored norm of B's random initial
        direction. The forward pass normalizes B_D, so this norm changes nothing in the model, only how fast
        Adam can turn it: a small norm lets the first gradients set B's direction, as they do for plain
        LoRA's zero-initialized B. `b_direction="free"`: B = diag(B_M)·B_D with B_D not normalized (PEFT's
        zero init) and B_M a gain starting at 1 (`core.magdir.GainDirection`); the two options above then do
        not apply, and B.dir is no direction for aggregation (`axes` names only A.dir)."""
        super().__init__(lora_cfg, **other)
        if b_direction not in ("unit", "free"):
            raise ValueError(f"b_direction must be 'unit' or 'free', got {b_direction!r}")
        self.b_free = b_direction == "free"
        self._axes: dict[str, Axis] = {"A.dir": norm_axis_a, "B.dir": norm_axis_b}
        self.b_mag_init, self.b_dir_init_norm = b_mag_init, b_dir_init_norm

    @property
    def axes(self) -> dict[str, Axis]:
        """The components the model sees only as unit vectors (normalized on aggregation)."""
        return {c: a for c, a in self._axes.items() if not (self.b_free and c == "B.dir")}

    def _compose_b(self, direction, magnitude):
        axis = self._axes["B.dir"]
        return scale(direction, magnitude, axis) if self.b_free else compose(direction, magnitude, axis)

    def install(self, model, peft_config):
        """A = diag(A_M)·A_D from PEFT's init; B = diag(B_M)·B_D with random unit B_D and B_M = b_mag_init, or
        (free) PEFT's zero B_D and gains of 1."""
        for _, layer in lora_layers(model):
            a_lin, b_lin = layer.lora_A["default"], layer.lora_B["default"]
            parametrize.register_parametrization(a_lin, "weight", MagnitudeDirection(self._axes["A.dir"]))
            b_form = GainDirection if self.b_free else MagnitudeDirection
            parametrize.register_parametrization(b_lin, "weight", b_form(self._axes["B.dir"]))
            with torch.no_grad():
                a = a_lin.parametrizations.weight
                a.original0.copy_(unit(a.original0, self._axes["A.dir"]))
                if self.b_free:  # PEFT's zero B and gains of 1 (right_inverse)
                    continue
                b = b_lin.parametrizations.weight
                b.original0.copy_(unit(torch.randn_like(b.original0), self._axes["B.dir"]) * self.b_dir_init_norm)
                b.original1.fill_(self.b_mag_init)

    def uninstall(self, model):
        for _, layer in lora_layers(model):
            for lin in (layer.lora_A["default"], layer.lora_B["default"]):
                if parametrize.is_parametrized(lin):
                    parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)

    def factors(self, state, layer):
        a, b = (f"{layer}.lora_{f}.default.parametrizations.weight.original" for f in ("A", "B"))
        return (compose(state[a + "0"], state[a + "1"], self._axes["A.dir"]),
                self._compose_b(state[b + "0"], state[b + "1"]))

    def export(self, am, state, out):
        self._save_factors(am, state, out)
