"""Named adapter components and the state dicts that carry them.

An adapter state is a flat `{parameter name: tensor}` dict of the trainable adapter parameters.
Each parameter belongs to exactly one named component; a method's policy speaks only of
components (`A`, `B` for LoRA; `A.dir`, `A.mag`, `B.dir`, `B.mag` for the magnitude/direction
LoRA; `W.mag` for DoRA; `L.A`, `L.B` for FedDPA's second, local adapter).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

State = dict[str, torch.Tensor]

# (pattern on the parameter name's tail, component). First match wins.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), c)
    for p, c in (
        (r"\.lora_A\.default\.parametrizations\.weight\.original0$", "A.dir"),
        (r"\.lora_A\.default\.parametrizations\.weight\.original1$", "A.mag"),
        (r"\.lora_B\.default\.parametrizations\.weight\.original0$", "B.dir"),
        (r"\.lora_B\.default\.parametrizations\.weight\.original1$", "B.mag"),
        (r"\.lora_A\.default\.weight$", "A"),
        (r"\.lora_B\.default\.weight$", "B"),
        (r"\.lora_magnitude_vector\.default\.weight$", "W.mag"),
        (r"\.lora_A\.local\.weight$", "L.A"),
        (r"\.lora_B\.local\.weight$", "L.B"),
    )
)

ALL_COMPONENTS: tuple[str, ...] = ("A", "B", "A.dir", "A.mag", "B.dir", "B.mag", "W.mag", "L.A", "L.B")


def component_of(name: str) -> str:
    for pattern, comp in _RULES:
        if pattern.search(name):
            return comp
    raise KeyError(f"parameter {name!r} belongs to no known adapter component")


def is_direction(component: str) -> bool:
    return component.endswith(".dir")


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
