"""Aggregation of client updates: example-weighted mean, direction-aware for `.dir` components."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .components import State, component_of
from .magdir import Axis, unit


@dataclass
class ClientUpdate:
    """What a client sends after its global phase: the shared components and how much it trained."""

    client_id: int
    state: State
    num_examples: int
    metrics: dict = field(default_factory=dict)


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights sum to zero")
    out: State = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float32)
        for s, w in zip(states, weights):
            acc.add_(s[key].float(), alpha=w / total)
        out[key] = acc.to(states[0][key].dtype)
    return out


def direction_aware_mean(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], axes: Mapping[str, Axis]
) -> State:
    """Weighted mean; direction tensors are normalized per vector before averaging and after.

    Normalizing first means a client's direction counts by its example weight, not by the
    (arbitrary) scale of its stored direction parameter.
    """
    prepared = []
    for s in states:
        prepared.append(
            {k: unit(v.float(), axes[component_of(k)]) if component_of(k) in axes else v for k, v in s.items()}
        )
    mean = weighted_mean(prepared, weights)
    return {k: unit(v, axes[component_of(k)]) if component_of(k) in axes else v for k, v in mean.items()}


def renormalize_directions(state: Mapping[str, torch.Tensor], axes: Mapping[str, Axis]) -> State:
    return {k: unit(v, axes[component_of(k)]) if component_of(k) in axes else v for k, v in state.items()}
