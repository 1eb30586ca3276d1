"""Robust aggregation: screen out updates with outlying norms, clip update norms, median / trimmed mean.

Everything here works on *deltas*: a client's uploaded shared state minus the current global
state, with direction components (`A.dir`, `B.dir`) normalized per vector first (as in
`direction_aware_mean`), so a direction's arbitrary stored scale neither counts toward a norm
nor survives into the aggregate. The combined result is `global + delta` with direction
components re-normalized, i.e. a state the server optimizer can step towards like a plain mean.

Pure PyTorch, no transport: the in-process simulator and the Flower ServerApp share it through
`Server.aggregate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .components import State, component_of
from .magdir import Axis, unit

AGGREGATIONS = ("mean", "median", "trimmed_mean")


@dataclass(frozen=True)
class RobustOptions:
    """How the server combines a round's valid updates (the `federation.*` fields of the same names)."""

    aggregation: str = "mean"
    """`mean` (example-weighted), `median` (coordinate-wise) or `trimmed_mean` (coordinate-wise)."""
    trim_fraction: float = 0.1
    """trimmed_mean: the fraction of clients dropped at EACH end, per coordinate."""
    clip_norm: float | None = None
    """Scale each client's delta down to at most this L2 norm (over all shared tensors)."""
    max_norm_ratio: float | None = None
    """Reject an update whose delta norm exceeds this multiple of the round's median delta norm."""

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm!r}")
        if self.max_norm_ratio is not None and not self.max_norm_ratio > 1:
            raise ValueError(f"max_norm_ratio must be > 1, got {self.max_norm_ratio!r}")

    @property
    def plain(self) -> bool:
        """The historical behaviour: an example-weighted mean of the states, nothing screened or clipped."""
        return self.aggregation == "mean" and self.clip_norm is None

    @classmethod
    def from_config(cls, fed_cfg) -> RobustOptions:
        """From a `FederationConfig` (or anything with these attributes; missing ones take the defaults)."""
        return cls(aggregation=getattr(fed_cfg, "aggregation", "mean"),
                   trim_fraction=getattr(fed_cfg, "trim_fraction", 0.1),
                   clip_norm=getattr(fed_cfg, "clip_norm", None),
                   max_norm_ratio=getattr(fed_cfg, "max_norm_ratio", None))


# ----------------------------------------------------------------------------- deltas and norms


def _prepared(state: Mapping[str, torch.Tensor], axes: Mapping[str, Axis]) -> State:
    """float32 copy with direction components normalized per vector."""
    out = {}
    for k, v in state.items():
        c = component_of(k)
        out[k] = unit(v.float(), axes[c]) if c in axes else v.float()
    return out


def deltas(states: Sequence[Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor],
           axes: Mapping[str, Axis]) -> list[State]:
    """Each client's change of the shared state (float32), directions compared as unit vectors."""
    ref = _prepared(reference, axes)
    return [{k: v - ref[k] for k, v in _prepared(s, axes).items()} for s in states]


def delta_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over every tensor of one client's delta (accumulated in float64)."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))


def lower_median(values: Sequence[float]) -> float:
    """The median; for an even count the lower of the two middle values (robust with only two clients)."""
    s = sorted(values)
    return s[(len(s) - 1) // 2]


def norm_outliers(norms: Sequence[float], max_ratio: float) -> dict[int, str]:
    """{position: reason} for every norm above `max_ratio` x the median of `norms`.

    No update is judged when the median is 0 (most clients did not move): there is no scale to compare to.
    """
    med = lower_median(norms)
    if med <= 0:
        return {}
    return {i: f"update norm {n:.4g} is {n / med:.1f}x the round's median {med:.4g} "
               f"(federation.max_norm_ratio={max_ratio:g})"
            for i, n in enumerate(norms) if n > max_ratio * med}


def clip(delta: Mapping[str, torch.Tensor], max_norm: float) -> tuple[State, bool]:
    """The delta scaled down to L2 norm `max_norm` if it is longer; and whether it was."""
    n = delta_norm(delta)
    if n <= max_norm:
        return dict(delta), False
    scale = max_norm / n
    return {k: v * scale for k, v in delta.items()}, True


# ----------------------------------------------------------------------------- combining


def weighted_delta_mean(ds: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights sum to zero")
    return {k: sum(d[k] * (w / total) for d, w in zip(ds, weights)) for k in ds[0]}


def coordinate_median(ds: Sequence[Mapping[str, torch.Tensor]]) -> State:
    """Per coordinate, the median over clients (the mean of the two middle values for an even count)."""
    return {k: torch.quantile(torch.stack([d[k] for d in ds]).flatten(1), 0.5, dim=0).reshape(ds[0][k].shape)
            for k in ds[0]}


def trimmed_mean(ds: Sequence[Mapping[str, torch.Tensor]], fraction: float) -> State:
    """Per coordinate, drop the floor(fraction * n) lowest and highest values over clients, average the rest."""
    n = len(ds)
    cut = int(math.floor(fraction * n))
    out = {}
    for k in ds[0]:
        stacked, _ = torch.sort(torch.stack([d[k] for d in ds]), dim=0)
        out[k] = stacked[cut:n - cut].mean(0)
    return out


def combine(ds: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], opts: RobustOptions) -> State:
    if opts.aggregation == "median":
        return coordinate_median(ds)
    if opts.aggregation == "trimmed_mean":
        return trimmed_mean(ds, opts.trim_fraction)
    return weighted_delta_mean(ds, weights)


def apply_delta(reference: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                axes: Mapping[str, Axis]) -> State:
    """`reference + delta`, direction components re-normalized, in the reference's dtypes."""
    ref = _prepared(reference, axes)
    out = {}
    for k, d in delta.items():
        v = ref[k] + d
        c = component_of(k)
        out[k] = (unit(v, axes[c]) if c in axes else v).to(reference[k].dtype)
    return out
