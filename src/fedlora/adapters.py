"""One base model with a method's adapter injected by PEFT; adapter states are swapped in and out.

The simulator keeps ONE of these for all clients: a client's adapter is a small state dict that
is copied into the model's adapter parameters before the client trains or is evaluated.
Everything that depends on the adapter kind is in its class (`fedlora.adapter_kinds`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import get_peft_model

from .adapter_kinds import AdapterKind, kind_class, lora_layers
from .adapter_kinds.base import canonical_adapter_config
from .core.components import State, clone
from .model import base_model_id as _base_model_id


class AdapterModel:
    """A PEFT-wrapped base model for one adapter kind (`lora`, `magdir`, `dora`, `dual`: `adapter_kinds.KINDS`).

    `norm_axis_a`, `norm_axis_b`, `b_mag_init`, `b_dir_init_norm` and `b_direction` are the magnitude/direction
    kind's options (see `MagDirKind`); the other kinds ignore them.
    """

    def __init__(self, base_model, kind: str, lora_cfg, *, norm_axis_a="rows", norm_axis_b="rows",
                 b_mag_init: float = 0.0, b_dir_init_norm: float = 1.0, b_direction: str = "unit", seed: int = 0,
                 base_name: str = ""):
        self.impl: AdapterKind = kind_class(kind)(lora_cfg, norm_axis_a=norm_axis_a, norm_axis_b=norm_axis_b,
                                                  b_mag_init=b_mag_init, b_dir_init_norm=b_dir_init_norm,
                                                  b_direction=b_direction)
        self.kind = kind
        self.lora_cfg = lora_cfg
        self.axes = self.impl.axes
        self.base_name = base_name
        self.peft_config = self.impl.peft_config(base_name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                self.model = get_peft_model(base_model, self.peft_config)
            except ValueError as e:
                raise _target_error(lora_cfg.target_modules, e) from None
            self.impl.install(self.model, self.peft_config)
        self.params: dict[str, torch.nn.Parameter] = {}
        self.components: dict[str, str] = {}
        for n, p in self.model.named_parameters():
            comp = self.impl.component_of(n)
            if comp is not None:
                self.params[n], self.components[n] = p, comp
            elif ".lora_" in n:
                raise RuntimeError(f"adapter parameter {n!r} belongs to no component of adapter kind {kind!r}")
        for p in self.params.values():
            p.requires_grad_(False)
        self.init_state: State = self.state()

    @classmethod
    def for_method(cls, base_model, method, cfg) -> AdapterModel:
        """The adapter of `method` (a `core.methods.Method`) as the full `Config` sets it up: `cfg.lora`, the
        kind's options from `cfg.method_options`, `cfg.seed` and `cfg.model.name`."""
        mo = cfg.method_options
        return cls(base_model, method.adapter, cfg.lora, norm_axis_a=mo.norm_axis_a, norm_axis_b=mo.norm_axis_b,
                   b_mag_init=mo.b_mag_init, b_dir_init_norm=mo.b_dir_init_norm, b_direction=mo.b_direction,
                   seed=cfg.seed,
                   base_name=cfg.model.name)

    def lora_layers(self):
        """(name, module) of every PEFT LoRA layer of the model."""
        return lora_layers(self.model)

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
        self.impl.uninstall(self.model)
        base = self.model.unload()
        self.params = {}
        return base

    # ------------------------------------------------------------------ export
    @property
    def base_model_id(self) -> str:
        """The base model as exported adapters name it (`model.base_model_id`); "" when not known."""
        return _base_model_id(self.base_name) if self.base_name else ""

    def export_peft(self, state: Mapping[str, torch.Tensor], out_dir: str | Path, card: str | None = None) -> Path:
        """Write `state` as a plain PEFT adapter that `PeftModel.from_pretrained` loads with no code of ours.

        LoRA and DoRA use PEFT's own saving; the other kinds write their effective LoRA factors
        (see each kind's `export`). adapter_config.json names the base model by its hub id or directory and
        is the same bytes for the same state; README.md is a model card (`write_card`, `card`: its body).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.impl.export(self, state, out)
        canonical_adapter_config(out, self.base_model_id)
        self.write_card(out, card)
        return out

    def write_card(self, out: Path, body: str | None = None) -> None:
        """README.md as the hub and PEFT expect it: a YAML header (`base_model`, `library_name: peft`), then `body`."""
        base = self.base_model_id
        if base and not re.fullmatch(r"[\w./-]+", base):
            base = json.dumps(base)  # YAML reads a JSON string as it is
        head = ["---", *([f"base_model: {base}"] if base else []), "library_name: peft", "tags:", "- lora",
                "- fedlora", "---", ""]
        body = body or (f"# LoRA adapter (fedlora adapter kind {self.kind!r})\n\n"
                        f"Load it with `PeftModel.from_pretrained(base_model, this_directory)`.\n")
        (Path(out) / "README.md").write_text("\n".join(head) + body)


def _target_error(targets, err):
    from .errors import ConfigError

    return ConfigError(f"lora.target_modules: {list(targets)} do not match modules of this model ({err})")
