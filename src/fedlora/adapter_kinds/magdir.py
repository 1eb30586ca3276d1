"""Magnitude/direction LoRA: A = diag(A_M)·A_D and B = diag(B_M)·B_D (with "rows"; "cols" scales columns).

Installed with `torch.nn.utils.parametrize` over PEFT's lora_A/lora_B weights (`core.magdir`), so PEFT keeps
injection and forward; the stored direction (`original0`) and magnitude (`original1`) are the parameters.
Exported by multiplying the parts back into plain lora_A / lora_B weights.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from ..core.components import MAGDIR
from ..core.magdir import Axis, MagnitudeDirection, compose, unit
from .base import AdapterKind, lora_layers


class MagDirKind(AdapterKind):
    naming = MAGDIR
    lockstep = True

    def __init__(self, lora_cfg, *, norm_axis_a: Axis = "rows", norm_axis_b: Axis = "rows",
                 b_mag_init: float = 0.0, b_dir_init_norm: float = 1.0, **other):
        """`b_mag_init`: B's initial magnitudes. `b_dir_init_norm`: the stored norm of B's random initial
        direction. The forward pass normalizes B_D, so this norm changes nothing in the model, only how fast
        Adam can turn it: a small norm lets the first gradients set B's direction, as they do for plain
        LoRA's zero-initialized B."""
        super().__init__(lora_cfg, **other)
        self._axes: dict[str, Axis] = {"A.dir": norm_axis_a, "B.dir": norm_axis_b}
        self.b_mag_init, self.b_dir_init_norm = b_mag_init, b_dir_init_norm

    @property
    def axes(self) -> dict[str, Axis]:
        return dict(self._axes)

    def install(self, model, peft_config):
        """A = diag(A_M)·A_D from PEFT's init; B = diag(B_M)·B_D with random B_D and B_M = b_mag_init."""
        for _, layer in lora_layers(model):
            a_lin, b_lin = layer.lora_A["default"], layer.lora_B["default"]
            parametrize.register_parametrization(a_lin, "weight", MagnitudeDirection(self._axes["A.dir"]))
            parametrize.register_parametrization(b_lin, "weight", MagnitudeDirection(self._axes["B.dir"]))
            with torch.no_grad():
                a = a_lin.parametrizations.weight
                a.original0.copy_(unit(a.original0, self._axes["A.dir"]))
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
                compose(state[b + "0"], state[b + "1"], self._axes["B.dir"]))

    def export(self, am, state, out):
        self._save_factors(am, state, out)
