"""One base model with a method's adapter injected by PEFT; adapter states are swapped in and out.

The simulator keeps ONE of these for all clients: a client's adapter is a small state dict that
is copied into the model's adapter parameters before the client trains or is evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import save_file
from torch.nn.utils import parametrize

from .core.components import State, clone, component_of
from .core.magdir import MagnitudeDirection, compose, unit
from .core.methods import ADAPTER_COMPONENTS

LOCAL_ADAPTER = "local"


class AdapterModel:
    """A PEFT-wrapped base model for one adapter kind (`lora`, `magdir`, `dora`, `dual`)."""

    def __init__(self, base_model, kind: str, lora_cfg, *, norm_axis_a="rows", norm_axis_b="rows",
                 b_mag_init: float = 0.0, b_dir_init_norm: float = 1.0, seed: int = 0, base_name: str = ""):
        if kind not in ADAPTER_COMPONENTS:
            raise ValueError(f"unknown adapter kind {kind!r}")
        self.kind = kind
        self.lora_cfg = lora_cfg
        self.axes = {"A.dir": norm_axis_a, "B.dir": norm_axis_b}
        self.base_name = base_name
        self.peft_config = PeftLoraConfig(
            r=lora_cfg.r,
            lora_alpha=lora_cfg.alpha,
            lora_dropout=lora_cfg.dropout,
            target_modules=list(lora_cfg.target_modules),
            use_dora=kind == "dora",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_name or None,
        )
        devrng = torch.random.fork_rng(devices=[])
        with devrng:
            torch.manual_seed(seed)
            try:
                self.model = get_peft_model(base_model, self.peft_config)
            except ValueError as e:
                raise _target_error(lora_cfg.target_modules, e) from None
            if kind == "dual":
                self.model.add_adapter(LOCAL_ADAPTER, self.peft_config)
                self.model.base_model.set_adapter(["default", LOCAL_ADAPTER])
            if kind == "magdir":
                self._decompose(b_mag_init, b_dir_init_norm)
        self.params: dict[str, torch.nn.Parameter] = {
            n: p for n, p in self.model.named_parameters() if _is_adapter_param(n)
        }
        self.components: dict[str, str] = {n: component_of(n) for n in self.params}
        for p in self.params.values():
            p.requires_grad_(False)
        self.init_state: State = self.state()

    # ------------------------------------------------------------------ construction
    def _lora_layers(self):
        for name, module in self.model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                yield name, module

    def _decompose(self, b_mag_init: float, b_dir_init_norm: float = 1.0) -> None:
        """A = diag(A_M)·A_D from PEFT's init; B = diag(B_M)·B_D with random B_D and B_M = b_mag_init.

        The forward pass normalizes B_D, so its stored norm (`b_dir_init_norm`) changes nothing in the
        model, only how fast Adam can turn it: a small norm lets the first gradients set B's direction,
        as they do for plain LoRA's zero-initialized B.
        """
        for _, layer in self._lora_layers():
            a_lin, b_lin = layer.lora_A["default"], layer.lora_B["default"]
            parametrize.register_parametrization(a_lin, "weight", MagnitudeDirection(self.axes["A.dir"]))
            parametrize.register_parametrization(b_lin, "weight", MagnitudeDirection(self.axes["B.dir"]))
            with torch.no_grad():
                a = a_lin.parametrizations.weight
                a.original0.copy_(unit(a.original0, self.axes["A.dir"]))
                b = b_lin.parametrizations.weight
                b.original0.copy_(unit(torch.randn_like(b.original0), self.axes["B.dir"]) * b_dir_init_norm)
                b.original1.fill_(b_mag_init)

    # ------------------------------------------------------------------ state swapping
    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def state(self) -> State:
        return clone({n: p for n, p in self.params.items()})

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, v in state.items():
                self.params[n].copy_(v)

    def set_trainable(self, components: Iterable[str]) -> dict[str, list[torch.nn.Parameter]]:
        """Make exactly these components trainable; returns their parameters grouped by component."""
        wanted = set(components)
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for n, p in self.params.items():
            comp = self.components[n]
            p.requires_grad_(comp in wanted)
            if comp in wanted:
                groups.setdefault(comp, []).append(p)
        return groups

    def release(self):
        """Remove the adapter and return the clean base model (for reuse by another method)."""
        for _, layer in self._lora_layers():
            for lin in (layer.lora_A["default"], layer.lora_B["default"]):
                if parametrize.is_parametrized(lin):
                    parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
        base = self.model.unload()
        self.params = {}
        return base

    # ------------------------------------------------------------------ export
    def export_peft(self, state: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
        """Write `state` as a plain PEFT adapter that `PeftModel.from_pretrained` loads with no code of ours.

        LoRA and DoRA use PEFT's own saving. The magnitude/direction parts are multiplied back into
        `lora_A.weight` / `lora_B.weight`; FedDPA's two LoRAs become one LoRA of rank 2r (A stacked,
        B side by side, alpha doubled so that the scale alpha/r is unchanged).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.kind in ("lora", "dora"):
            saved = self.state()
            self.load_state(state)
            try:
                self.model.save_pretrained(out, selected_adapters=["default"])
            finally:
                self.load_state(saved)
            return out
        tensors, rank, alpha = {}, self.lora_cfg.r, self.lora_cfg.alpha
        for name, _ in self._lora_layers():
            a, b = self._effective_factors(state, name)
            tensors[f"{name}.lora_A.weight"] = a.detach().float().contiguous().cpu()
            tensors[f"{name}.lora_B.weight"] = b.detach().float().contiguous().cpu()
        if self.kind == "dual":
            rank, alpha = 2 * rank, 2 * alpha
        cfg = PeftLoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=self.lora_cfg.dropout,
            target_modules=list(self.lora_cfg.target_modules), task_type="CAUSAL_LM",
            base_model_name_or_path=self.base_name or None,
        )
        cfg.save_pretrained(out)
        save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
        (out / "fedlora_export.json").write_text(json.dumps({"adapter_kind": self.kind}) + "\n")
        return out

    def _effective_factors(self, state: Mapping[str, torch.Tensor], layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "magdir":
            pa = f"{layer}.lora_A.default.parametrizations.weight"
            pb = f"{layer}.lora_B.default.parametrizations.weight"
            a = compose(state[pa + ".original0"], state[pa + ".original1"], self.axes["A.dir"])
            b = compose(state[pb + ".original0"], state[pb + ".original1"], self.axes["B.dir"])
            return a, b
        a = torch.cat([state[f"{layer}.lora_A.default.weight"], state[f"{layer}.lora_A.{LOCAL_ADAPTER}.weight"]], 0)
        b = torch.cat([state[f"{layer}.lora_B.default.weight"], state[f"{layer}.lora_B.{LOCAL_ADAPTER}.weight"]], 1)
        return a, b


def _is_adapter_param(name: str) -> bool:
    try:
        component_of(name)
        return True
    except KeyError:
        return False


def _target_error(targets, err):
    from .errors import ConfigError

    return ConfigError(f"lora.target_modules: {list(targets)} do not match modules of this model ({err})")
