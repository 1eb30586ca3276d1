"""The adapter kinds, one class each, and the registry from a kind's name (`Method.adapter`) to its class."""

from __future__ import annotations

from ..core.components import NAMINGS
from .base import AdapterKind, lora_layers
from .dora import DoraKind
from .dual import DualKind
from .lora import LoraKind
from .magdir import MagDirKind

KINDS: dict[str, type[AdapterKind]] = {cls.naming.kind: cls for cls in (LoraKind, MagDirKind, DoraKind, DualKind)}
assert KINDS.keys() == NAMINGS.keys(), "every named adapter kind needs its class"


def kind_class(name: str) -> type[AdapterKind]:
    """The class of adapter kind `name`; a ValueError of one line for an unknown name."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown adapter kind {name!r}; known: {', '.join(KINDS)}") from None


__all__ = ["AdapterKind", "DoraKind", "DualKind", "KINDS", "LoraKind", "MagDirKind", "kind_class", "lora_layers"]
