"""Named adapter components and the state dicts that carry them.

An adapter state is a flat `{parameter name: tensor}` dict of the trainable adapter parameters.
Each parameter belongs to exactly one named component; a method's policy speaks only of
components (`A`, `B` for LoRA; `A.dir`, `A.mag`, `B.dir`, `B.mag` for the magnitude/direction
LoRA; `W.mag` for DoRA; `L.A`, `L.B` for FedDPA's second, local adapter).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Naming:
    """One adapter kind's components, each with the pattern its parameters' names end with (PEFT's naming).

    The PEFT side of a kind (install, export, batched weights) is its class in `fedlora.adapter_kinds`;
    this is the pure naming part that the server and the methods need.
    """

    kind: str
    patterns: Mapping[str, str]
    """component -> regex on the parameter name's tail"""

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.patterns)

    def component_of(self, name: str) -> str | None:
        """The component of parameter `name`, or None if it is none of this kind's."""
        return next((c for c, p in self.patterns.items() if re.search(p, name)), None)


DUAL_LOCAL_ADAPTER = "local"
"""The PEFT adapter name of FedDPA's second, local LoRA (the first is PEFT's "default")."""

_A, _B = r"\.lora_A\.default\.weight$", r"\.lora_B\.default\.weight$"
_PARAM = r"\.lora_{}\.default\.parametrizations\.weight\.original{}$"

LORA = Naming("lora", {"A": _A, "B": _B})
MAGDIR = Naming("magdir", {"A.dir": _PARAM.format("A", 0), "A.mag": _PARAM.format("A", 1),
                           "B.dir": _PARAM.format("B", 0), "B.mag": _PARAM.format("B", 1)})
DORA = Naming("dora", {"A": _A, "B": _B, "W.mag": r"\.lora_magnitude_vector\.default\.weight$"})
DUAL = Naming("dual", {"A": _A, "B": _B, "L.A": rf"\.lora_A\.{DUAL_LOCAL_ADAPTER}\.weight$",
                       "L.B": rf"\.lora_B\.{DUAL_LOCAL_ADAPTER}\.weight$"})
NAMINGS: dict[str, Naming] = {n.kind: n for n in (LORA, MAGDIR, DORA, DUAL)}

# (pattern, component) over all kinds; a pattern that several kinds share appears once
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), c) for p, c in dict.fromkeys((p, c) for n in NAMINGS.values() for c, p in n.patterns.items())
)

ALL_COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(c for _, c in _RULES))


def component_of(name: str) -> str:
    """The component of parameter `name`, whatever its kind (no two kinds name a component differently)."""
    for pattern, comp in _RULES:
        if pattern.search(name):
            return comp
    raise KeyError(f"parameter {name!r} belongs to no known adapter component")


def select(state: Mapping[str, torch.Tensor], components: Iterable[str]) -> State:
    """The part of `state` that belongs to `components` (same tensors, no copy)."""
    wanted = set(components)
    return {k: v for k, v in state.items() if component_of(k) in wanted}


def split(state: Mapping[str, torch.Tensor]) -> dict[str, State]:
    out: dict[str, State] = {}
    for k, v in state.items():
        out.setdefault(component_of(k), {})[k] = v
    return out


def join(*states: Mapping[str, torch.Tensor]) -> State:
    """Union of states; later ones win on shared keys."""
    out: State = {}
    for s in states:
        out.update(s)
    return out


def clone(state: Mapping[str, torch.Tensor], device: str | torch.device | None = None) -> State:
    return {k: v.detach().to(device=device, copy=True) if device else v.detach().clone() for k, v in state.items()}


def transfer_dtype(name: str) -> torch.dtype | None:
    """`federation.transfer_dtype` as a torch dtype; None for float32 (tensors travel as they are)."""
    return None if name == "float32" else {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def cast_floats(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> State:
    """`state` with its floating-point tensors in `dtype` (the same tensors where they already are; None: as is)."""
    if dtype is None:
        return dict(state)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def numel(state: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())
