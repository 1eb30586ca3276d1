"""FedDPA's two LoRAs: the global one (PEFT's "default": A, B) and a local one (`L.A`, `L.B`), both active.

Exported as one LoRA of rank 2r: A stacked, B side by side, alpha doubled so that the scale alpha/r is
unchanged, which is the sum of the two adapters' outputs.
"""

from __future__ import annotations

import torch

from ..core.components import DUAL, DUAL_LOCAL_ADAPTER
from .base import AdapterKind


class DualKind(AdapterKind):
    naming = DUAL

    def install(self, model, peft_config):
        model.add_adapter(DUAL_LOCAL_ADAPTER, peft_config)
        model.base_model.set_adapter(["default", DUAL_LOCAL_ADAPTER])

    def factors(self, state, layer):
        a = [state[f"{layer}.lora_A.{adapter}.weight"] for adapter in ("default", DUAL_LOCAL_ADAPTER)]
        b = [state[f"{layer}.lora_B.{adapter}.weight"] for adapter in ("default", DUAL_LOCAL_ADAPTER)]
        return torch.cat(a, -2), torch.cat(b, -1)

    def export(self, am, state, out):
        self._save_factors(am, state, out, rank_factor=2)
