"""Plain LoRA: components A and B, PEFT's own layers and saving."""

from __future__ import annotations

from ..core.components import LORA
from .base import AdapterKind


class LoraKind(AdapterKind):
    naming = LORA
    lockstep = True

    def factors(self, state, layer):
        return state[f"{layer}.lora_A.default.weight"], state[f"{layer}.lora_B.default.weight"]

    def export(self, am, state, out):
        self._save_with_peft(am, state, out)
