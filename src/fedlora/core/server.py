"""The server side of a round: validate uploads, aggregate the shared components, step the server optimizer."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .aggregate import ClientUpdate, direction_aware_mean, renormalize_directions
from .components import State, clone, select
from .magdir import Axis
from .methods import Method

log = logging.getLogger("fedlora.server")


@dataclass
class RoundReport:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    num_examples: int = 0


def check_update(update: ClientUpdate, expected: Mapping[str, torch.Tensor]) -> str | None:
    """Why an update cannot be aggregated, or None if it is well-formed."""
    keys, want = set(update.state), set(expected)
    if keys != want:
        missing, extra = sorted(want - keys), sorted(keys - want)
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        return f"wrong keys ({what}{' and more' if len(missing) + len(extra) > 1 else ''})"
    for k, v in update.state.items():
        ref = expected[k]
        if not isinstance(v, torch.Tensor):
            return f"{k} is not a tensor"
        if tuple(v.shape) != tuple(ref.shape):
            return f"{k} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}"
        if v.dtype != ref.dtype:
            return f"{k} has dtype {v.dtype}, expected {ref.dtype}"
        if not torch.isfinite(v).all():
            return f"{k} contains NaN or Inf"
    if not isinstance(update.num_examples, int) or update.num_examples <= 0:
        return f"num_examples must be a positive integer, got {update.num_examples!r}"
    if not math.isfinite(float(update.metrics.get("train_loss", 0.0))):
        return "training loss is not finite"
    return None


class Server:
    """Holds the global adapter state and turns a round's uploads into the next global state."""

    def __init__(self, method: Method, init_state: State, optimizer, direction_axes: Mapping[str, Axis]):
        self.method = method
        self.global_state: State = clone(init_state)
        self.optimizer = optimizer
        self.axes = dict(direction_axes)

    def shared_state(self) -> State:
        """What is sent down to clients each round."""
        return select(self.global_state, self.method.shared)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> RoundReport:
        report = RoundReport()
        expected = self.shared_state()
        good = []
        for u in updates:
            reason = check_update(u, expected) if expected else None
            if reason:
                report.rejected[u.client_id] = reason
                log.warning("round update from client %s rejected: %s", u.client_id, reason)
            else:
                good.append(u)
                report.accepted.append(u.client_id)
                report.num_examples += u.num_examples
        if not expected or not good:
            return report
        mean = direction_aware_mean([u.state for u in good], [u.num_examples for u in good], self.axes)
        delta = {k: mean[k] - expected[k] for k in expected}
        stepped = renormalize_directions(self.optimizer.step(expected, delta), self.axes)
        self.global_state.update({k: v.to(expected[k].dtype) for k, v in stepped.items()})
        return report
