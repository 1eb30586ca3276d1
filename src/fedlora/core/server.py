"""The server side of a round: validate uploads, aggregate the shared components, step the server optimizer.

Validation (keys, shapes, dtypes, NaN/Inf, example counts, and optionally delta norms far beyond
the round's median) rejects single updates with a logged reason; the round aggregates the rest.
`state_dict()` / `load_state_dict()` carry everything the server needs to resume (global state
and server optimizer state), for the simulator's checkpoints and for a Flower ServerApp alike.
With client-level differential privacy on (`core.dp`), `central` mode clips every delta and adds noise to
their uniform mean here; `local` mode aggregates the clients' already noisy uploads with uniform weights; both
account the budget ε spent so far and report it in `RoundReport.privacy`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import dp, robust
from .aggregate import ClientUpdate, direction_aware_mean, renormalize_directions
from .components import State, cast_floats, clone, component_of, select
from .magdir import Axis, vector_norms
from .methods import Method

log = logging.getLogger("fedlora.server")


@dataclass
class RoundReport:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    num_examples: int = 0
    clipped: list[int] = field(default_factory=list)
    """Accepted clients whose delta was scaled down to `clip_norm`."""
    privacy: dict | None = None
    """Differential privacy of the round (noise, clip, the accountant's epsilon so far); None when DP is off."""


def check_update(update: ClientUpdate, expected: Mapping[str, torch.Tensor]) -> str | None:
    """Why an update cannot be aggregated, or None if it is well-formed."""
    if update.metrics.get("diverged"):
        return "training diverged (the loss became NaN or Inf); the client sent no update"
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

    def __init__(self, method: Method, init_state: State, optimizer, direction_axes: Mapping[str, Axis],
                 robust_options: robust.RobustOptions | None = None, keep_direction_scale: bool = False,
                 transfer_dtype: torch.dtype | None = None, privacy: dp.DPOptions | None = None):
        self.method = method
        self.transfer_dtype = transfer_dtype
        """Dtype of what travels (None: the global state's own); the server keeps and aggregates its own dtype."""
        self.keep_direction_scale = keep_direction_scale
        self.global_state: State = clone(init_state)
        self.optimizer = optimizer
        self.axes = dict(direction_axes)
        self.robust = robust_options or robust.RobustOptions()
        self.privacy = privacy
        """Client-level DP (`core.dp.DPOptions`); None: off, and nothing below changes."""
        if privacy is not None and privacy.mode == "central" and (
                not self.robust.plain or self.robust.max_norm_ratio is not None):
            raise ValueError("central DP calibrates its noise to a mean of clipped updates: it needs the plain "
                             "mean, no clip_norm and no max_norm_ratio")
        self._dp_releases = 0
        """central: noisy aggregates published so far (also the key of the next one's noise)."""
        self._dp_uploads: dict[int, int] = {}
        """local: noisy uploads received so far, per client."""
        self._accountant: dp.Accountant | None = None

    def shared_state(self) -> State:
        """What is sent down to clients each round (in the transfer dtype); uploads must match it."""
        return cast_floats(self._shared(), self.transfer_dtype)

    def _shared(self) -> State:
        return select(self.global_state, self.method.shared)

    def _reject(self, report: RoundReport, cid: int, reason: str) -> None:
        report.rejected[cid] = reason
        log.warning("round update from client %s rejected: %s", cid, reason)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> RoundReport:
        report = RoundReport()
        if self.privacy is not None and self.privacy.mode == "local":  # each upload that left a client
            for u in updates:
                if u.state:
                    self._dp_uploads[u.client_id] = self._dp_uploads.get(u.client_id, 0) + 1
        wire, expected = self.shared_state(), self._shared()
        good = []
        for u in updates:
            reason = check_update(u, wire) if expected else None
            if reason:
                self._reject(report, u.client_id, reason)
            else:  # aggregated in the server's own dtype
                good.append(ClientUpdate(u.client_id, {k: v.to(expected[k].dtype) for k, v in u.state.items()},
                                         u.num_examples, u.metrics))
        if expected and good and self.robust.max_norm_ratio is not None:
            norms = [robust.delta_norm(d) for d in robust.deltas([u.state for u in good], expected, self.axes)]
            outliers = robust.norm_outliers(norms, self.robust.max_norm_ratio)
            for i, reason in outliers.items():
                self._reject(report, good[i].client_id, reason)
            good = [u for i, u in enumerate(good) if i not in outliers]
        report.accepted = [u.client_id for u in good]
        report.num_examples = sum(u.num_examples for u in good)
        if not expected or not good:
            report.privacy = self._privacy_report(report, len(good)) if self.privacy is not None else None
            return report
        weights = [u.num_examples for u in good] if self.privacy is None else [1] * len(good)  # DP: uniform
        if self.privacy is not None and self.privacy.mode == "central":
            mean = self._central_dp_mean(good, expected, report)
        elif self.robust.plain and self.privacy is None:
            mean = direction_aware_mean([u.state for u in good], weights, self.axes)
        else:
            ds = robust.deltas([u.state for u in good], expected, self.axes)
            if self.robust.clip_norm is not None:
                for i, u in enumerate(good):
                    ds[i], was_clipped = robust.clip(ds[i], self.robust.clip_norm)
                    if was_clipped:
                        report.clipped.append(u.client_id)
                        log.info("round update from client %s clipped to norm %g", u.client_id,
                                 self.robust.clip_norm)
            mean = robust.apply_delta(expected, robust.combine(ds, weights, self.robust), self.axes)
        delta = {k: mean[k] - expected[k] for k in expected}
        stepped = renormalize_directions(self.optimizer.step(expected, delta), self.axes)
        if self.keep_direction_scale:  # under DP the stored norms stay the server's own: no client data in them
            stepped = (self._rescale_directions(stepped, good, weights) if self.privacy is None
                       else self._rescale_directions(stepped, [ClientUpdate(-1, expected, 1)], [1]))
        self.global_state.update({k: v.to(expected[k].dtype) for k, v in stepped.items()})
        if self.privacy is not None:
            report.privacy = self._privacy_report(report, len(good))
        return report

    # ------------------------------------------------------------------ differential privacy
    def _central_dp_mean(self, good: Sequence[ClientUpdate], expected: State, report: RoundReport) -> State:
        """global ⊕ ((1/k) Σ clip_C(Δ_i) + N(0, (z·C/k)²)), seeded by (seed, release): see `core.dp`."""
        opts = self.privacy
        ds = robust.deltas([u.state for u in good], expected, self.axes)
        self._dp_releases += 1
        noisy, was, _ = dp.central_mean(ds, opts, dp.noise_generator(opts.seed, self._dp_releases, 0xDC))
        report.clipped = [u.client_id for u, w in zip(good, was) if w]
        return robust.apply_delta(expected, noisy, self.axes)

    def _privacy_report(self, report: RoundReport, aggregated: int) -> dict:
        opts = self.privacy
        if self._accountant is None:
            self._accountant = dp.Accountant(opts)
        if opts.mode == "central":
            self._accountant.advance(self._dp_releases)
            k = max(opts.per_round, aggregated)  # the mean's fixed denominator (`dp.central_mean`)
            extra = {"noise_std": dp.noise_std(opts.noise_multiplier, opts.clipping_norm, k),
                     "clipped": len(report.clipped)}
        else:
            self._accountant.advance(max(self._dp_uploads.values(), default=0))
            extra = {"noise_std": dp.noise_std(opts.noise_multiplier, opts.clipping_norm)}
        return dp.report(opts, self._accountant, aggregated=aggregated, **extra)

    def _rescale_directions(self, state: State, good: Sequence[ClientUpdate], weights: Sequence[float]) -> State:
        """Give each aggregated unit direction the clients' mean stored norm.

        The forward pass normalizes directions, so this changes nothing the model computes; it keeps the
        optimizer's step size relative to the direction (how fast Adam turns it) what it was on the clients.
        """
        total = float(sum(weights))
        out = dict(state)
        for k, v in state.items():
            comp = component_of(k)
            if comp not in self.axes:
                continue
            axis = self.axes[comp]
            norms = sum(w / total * vector_norms(u.state[k].float(), axis) for u, w in zip(good, weights))
            out[k] = v * (norms.unsqueeze(1) if axis == "rows" else norms.unsqueeze(0)).to(v.dtype)
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Global state and server optimizer state: all a server needs to continue after a restart."""
        out = {"global_state": clone(self.global_state, "cpu"),
               "optimizer": _moved(self.optimizer.state_dict(), "cpu")}
        if self.privacy is not None:  # the accountant's ledger (and the next central noise key)
            out["privacy"] = {"releases": self._dp_releases, "uploads": dict(self._dp_uploads)}
        return out

    def load_state_dict(self, state: Mapping) -> None:
        """Restore `state_dict()`; refuses (ValueError) a global state that does not fit this adapter."""
        g = state["global_state"]
        problem = check_update(ClientUpdate(-1, dict(g), 1), self.global_state)
        if problem:
            raise ValueError(f"saved global state does not fit this adapter: {problem}")
        device = next(iter(self.global_state.values())).device if self.global_state else torch.device("cpu")
        self.global_state = clone(g, device)
        self.optimizer.load_state_dict(_moved(state["optimizer"], device))
        ledger = state.get("privacy") or {}
        self._dp_releases = int(ledger.get("releases", 0))
        self._dp_uploads = {int(c): int(n) for c, n in ledger.get("uploads", {}).items()}
        self._accountant = None


def _moved(obj, device):
    """A copy of a nest of dicts/lists/tensors with every tensor cloned onto `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device=device, copy=True)
    if isinstance(obj, Mapping):
        return {k: _moved(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_moved(v, device) for v in obj)
    return obj
