"""What every adapter kind provides; one subclass per kind (lora.py, magdir.py, dora.py, dual.py).

A kind object holds, in one place, everything that differs between kinds: its components and their
parameter names (`naming`, the pure part kept in `core.components`), how it is installed on a PEFT model
(with its own options), how a state becomes a plain PEFT LoRA adapter on disk, and its effective low-rank
factors, which `fedlora.lockstep` batches over clients. `AdapterModel` delegates to it and never asks
which kind it has.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import torch
from peft import LoraConfig as PeftLoraConfig
from safetensors.torch import save_file

from ..core.components import Naming
from ..core.magdir import Axis


SET_FIELDS = ("target_modules", "exclude_modules")
"""PEFT keeps these as sets and writes them in set order, which changes from one process to the next."""


def canonical_adapter_config(out: Path, base_model: str | None) -> None:
    """Rewrite `out`/adapter_config.json the same way every time: `base_model_name_or_path` = `base_model` (when
    known; a hub id or a local directory that `AutoPeftModelForCausalLM` resolves) and PEFT's sets as sorted lists."""
    path = out / "adapter_config.json"
    config = json.loads(path.read_text())
    if base_model:
        config["base_model_name_or_path"] = base_model
    for key in SET_FIELDS:
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))  # PEFT's own layout


def lora_layers(model) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) of every PEFT LoRA layer of `model`."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            yield name, module


class AdapterKind:
    """One adapter kind. Options of other kinds (the constructor gets all of them) are ignored."""

    naming: ClassVar[Naming]
    use_dora: ClassVar[bool] = False
    lockstep: ClassVar[bool] = False
    """Whether `fedlora.lockstep` can batch it: its layers compute exactly base(x) + scaling · B A x with
    B, A = `factors(...)`."""

    def __init__(self, lora_cfg, **_other_kinds_options):
        self.lora_cfg = lora_cfg

    @property
    def name(self) -> str:
        return self.naming.kind

    @property
    def components(self) -> tuple[str, ...]:
        return self.naming.components

    @property
    def axes(self) -> dict[str, Axis]:
        """The norm axis of each direction component (none outside the magnitude/direction kind)."""
        return {}

    def component_of(self, param_name: str) -> str | None:
        return self.naming.component_of(param_name)

    # ------------------------------------------------------------------ install / remove
    def peft_config(self, base_name: str = "", *, rank_factor: int = 1) -> PeftLoraConfig:
        """PEFT's config of this kind's default adapter (`rank_factor`: r and alpha multiplied, scale unchanged)."""
        c = self.lora_cfg
        return PeftLoraConfig(
            r=c.r * rank_factor, lora_alpha=c.alpha * rank_factor, lora_dropout=c.dropout,
            target_modules=list(c.target_modules), use_dora=self.use_dora, task_type="CAUSAL_LM",
            base_model_name_or_path=base_name or None,
        )

    def install(self, model, peft_config: PeftLoraConfig) -> None:
        """Kind-specific changes to a fresh `get_peft_model(base, peft_config)` (under the seeded RNG)."""

    def uninstall(self, model) -> None:
        """Undo `install` before PEFT unloads the adapter."""

    # ------------------------------------------------------------------ weights and export
    def factors(self, state: Mapping[str, torch.Tensor], layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective (A [r, in], B [out, r]) of LoRA layer `layer` in `state`; with tensors stacked along
        a leading axis (one entry per client), the stacked factors."""
        raise NotImplementedError(f"adapter kind {self.name!r} has no plain low-rank factors")

    def export(self, am, state: Mapping[str, torch.Tensor], out: Path) -> None:
        """Write `state` of `am` (an AdapterModel) into `out` as an adapter that plain PEFT loads."""
        raise NotImplementedError

    def _save_with_peft(self, am, state: Mapping[str, torch.Tensor], out: Path) -> None:
        """PEFT's own saving of the default adapter, with `state` loaded for the time of the save."""
        saved = am.state()
        am.load_state(state)
        try:
            am.model.save_pretrained(out, selected_adapters=["default"])
        finally:
            am.load_state(saved)

    def _save_factors(self, am, state: Mapping[str, torch.Tensor], out: Path, rank_factor: int = 1) -> None:
        """`factors` of every layer saved as a plain LoRA of rank `rank_factor` · r."""
        tensors = {}
        for name, _ in lora_layers(am.model):
            a, b = self.factors(state, name)
            tensors[f"{name}.lora_A.weight"] = a.detach().float().contiguous().cpu()
            tensors[f"{name}.lora_B.weight"] = b.detach().float().contiguous().cpu()
        self.peft_config(am.base_name, rank_factor=rank_factor).save_pretrained(out)
        save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
        (out / "fedlora_export.json").write_text(json.dumps({"adapter_kind": self.name}) + "\n")
