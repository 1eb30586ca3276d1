"""Client-level differential privacy of what travels: clip each client's update, add Gaussian noise, account ε.

A client's *update* is its delta (`robust.deltas`): its uploaded shared state minus the global state it
started from, direction components (`A.dir`, `B.dir`) compared as unit vectors, so a direction's arbitrary
stored scale neither counts toward the norm nor receives noise; the result is applied back with
`robust.apply_delta` (directions re-normalized: post-processing). ‖Δ‖ is the L2 norm over every shared tensor.

    clip_C(Δ) = Δ · min(1, C / ‖Δ‖)

`central` (server-side, DP-FedAvg of McMahan et al. 2018, https://arxiv.org/abs/1710.06963; the noise of
Flower's `DifferentialPrivacyServerSideFixedClipping`). The server clips every accepted delta and adds
noise to their *uniform* mean with a fixed denominator k, the planned clients per round:

    Δ̄ = (1/k) · Σ_i clip_C(Δ_i) + N(0, σ² I),   σ = z·C/k     (i.e. N(0, (z·C)²) on the sum, then / k)

k stays the planned number also when fewer updates arrive, which keeps the sensitivity C/k. Weights are
uniform, not by example count: the counts are not private and would change the sensitivity.

`local` (client-side): each client privatizes its own delta before upload; the server never sees a clean one:

    upload_i = global ⊕ (clip_C(Δ_i) + N(0, (z·C)² I))

the server then aggregates as configured (uniform weights); anything it does is post-processing.

Accounting (Google's `dp-accounting`, RDP accountant, add/remove-one client unless said otherwise): one
release per round with a published aggregate. z is the noise multiplier, q = k / n (clients per round /
clients), RDP orders α are dp-accounting's defaults, converted to (ε, δ) by its improved bound.

  * central, `poisson`: PoissonSampledDpEvent(q, Gaussian(z)), the standard DP-FedAvg account. The engine
    samples exactly k clients without replacement, for which Poisson accounting is an approximation (it can
    underestimate ε: Lebeda et al. 2024, "Avoiding pitfalls for privacy accounting of subsampled mechanisms
    under composition");
  * central, `fixed_size`: SampledWithoutReplacementDpEvent(n, k, Gaussian(z/2)) under replace-one, the bound
    for the sampler the engine uses (replacing a client moves the sum by up to 2C, hence z/2);
  * central, `none` and every `local` run: Gaussian(z) per release, no amplification by sampling (the server,
    the adversary of local DP, knows who was sampled). Local ε is that of the client with the most uploads.

Both amplification modes assume the sample is secret; the engine draws it from the run's seed. The noise here
is simulation-grade: seeded from (seed, round, client) for reproducible runs, torch's PRNG, floating-point
Gaussians; a deployment needs a secret seed and a secure sampler. Not covered: what else travels in the
clear (example counts, training losses, evaluation results).

Flower's DP pieces and why only `compute_stdv` is used: its strategy wrappers (`flwr.serverapp.strategy.
DifferentialPrivacy*FixedClipping`) and `LocalDpMod` wrap a Flower `Strategy` / client `Message`s, and our
server is not a Strategy (one `Server.aggregate` for every runtime); their clipping works on flat NumPy
arrays in place (not direction-aware) and their noise draws from NumPy's global, unseeded RNG (not
reproducible); `LocalDpMod` calibrates noise to a per-round ε, not to a noise multiplier. Flower's own
`RdpAccountant` wraps the same dp-accounting, but its strategies accept it only without amplification.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import robust
from .components import State, component_of
from .magdir import Axis, vector_norms

MODES = ("off", "central", "local")
ACCOUNTING = ("poisson", "fixed_size", "none")


@dataclass(frozen=True)
class DPOptions:
    """The `privacy.*` config fields, with the federation's size (n clients, k per round) and the run's seed."""

    mode: str = "central"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    accounting: str = "poisson"
    clients: int = 1
    per_round: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES[1:]:
            raise ValueError(f"privacy mode must be one of {MODES[1:]}, got {self.mode!r}")
        if self.accounting not in ACCOUNTING:
            raise ValueError(f"accounting must be one of {ACCOUNTING}, got {self.accounting!r}")
        if not (self.noise_multiplier > 0 and self.clipping_norm > 0 and 0 < self.delta < 1):
            raise ValueError("noise_multiplier and clipping_norm must be > 0, delta in (0, 1)")
        if not 1 <= self.per_round <= self.clients:
            raise ValueError(f"per_round must be in [1, clients={self.clients}], got {self.per_round}")

    @property
    def sample_rate(self) -> float:
        return self.per_round / self.clients

    @property
    def effective_accounting(self) -> str:
        """`none` for local DP (no amplification against the server) and when every client takes part."""
        return "none" if self.mode == "local" or self.per_round >= self.clients else self.accounting

    @classmethod
    def from_config(cls, cfg) -> DPOptions | None:
        """From a run `Config` (its `privacy`, `federation` and `seed`); None when DP is off."""
        p = getattr(cfg, "privacy", None)
        if p is None or p.mode == "off":
            return None
        n = cfg.federation.clients
        k = max(1, min(n, int(round(cfg.federation.fraction * n))))  # as engine.sample_clients draws them
        return cls(p.mode, p.noise_multiplier, p.clipping_norm, p.delta, p.accounting, n, k, cfg.seed)


# ----------------------------------------------------------------------------- noise


def noise_std(noise_multiplier: float, clipping_norm: float, num_sampled_clients: int = 1) -> float:
    """σ = z·C/k (Flower's `compute_stdv`, where this Flower has it): the std of the noise on a mean of k."""
    try:
        from flwr.supercore.differential_privacy import compute_stdv
    except ImportError:
        try:
            from flwr.common.differential_privacy import compute_stdv
        except ImportError:
            return float(noise_multiplier * clipping_norm / num_sampled_clients)
    return compute_stdv(noise_multiplier, clipping_norm, num_sampled_clients)


def noise_generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a key such as (seed, round, client): reproducible, independent per key."""
    state = np.random.SeedSequence([abs(int(k)) for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def add_noise(delta: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> State:
    """delta + N(0, std² I), drawn on the CPU in sorted key order (the same in every runtime and device)."""
    out = dict(delta)
    for k in sorted(delta):
        v = delta[k]
        out[k] = v + std * torch.randn(v.shape, generator=generator, dtype=torch.float32).to(v.device, v.dtype)
    return out


def clipped(ds: Sequence[Mapping[str, torch.Tensor]], clipping_norm: float) -> tuple[list[State], list[bool]]:
    """Each delta scaled to L2 norm at most C (`robust.clip`), and whether it was."""
    pairs = [robust.clip(d, clipping_norm) for d in ds]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def central_mean(ds: Sequence[Mapping[str, torch.Tensor]], opts: DPOptions,
                 generator: torch.Generator) -> tuple[State, list[bool], float]:
    """(1/k) Σ clip_C(Δ_i) + N(0, (z·C/k)²): the noisy mean, which deltas were clipped, and σ."""
    cs, was = clipped(ds, opts.clipping_norm)
    k = max(opts.per_round, len(cs))
    std = noise_std(opts.noise_multiplier, opts.clipping_norm, k)
    total = {name: sum(c[name] for c in cs) for name in cs[0]}
    return add_noise({name: v / k for name, v in total.items()}, std, generator), was, std


def privatize_upload(upload: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                     axes: Mapping[str, Axis], opts: DPOptions, generator: torch.Generator) -> tuple[State, bool]:
    """Local DP: reference ⊕ (clip_C(Δ) + N(0, (z·C)²)), in the reference's dtypes; and whether Δ was clipped.

    Directions come back with the reference's stored norms (public: what the server sent), so nothing about
    the client's own stored scale leaves it.
    """
    (d,), (was,) = clipped(robust.deltas([upload], reference, axes), opts.clipping_norm)
    noisy = add_noise(d, noise_std(opts.noise_multiplier, opts.clipping_norm), generator)
    out = robust.apply_delta(reference, noisy, axes)
    for k, v in out.items():
        c = component_of(k)
        if c in axes:
            norms = vector_norms(reference[k].float(), axes[c])
            out[k] = (v.float() * (norms.unsqueeze(-1) if axes[c] == "rows" else norms.unsqueeze(0))).to(v.dtype)
    return out, was


# ----------------------------------------------------------------------------- accounting


class Accountant:
    """ε after `count` releases of one round's mechanism (dp-accounting's RdpAccountant), composed as they come."""

    def __init__(self, opts: DPOptions):
        from dp_accounting import NeighboringRelation, dp_event
        from dp_accounting.rdp import RdpAccountant

        self.opts, self.count = opts, 0
        z, how = opts.noise_multiplier, opts.effective_accounting
        relation = NeighboringRelation.ADD_OR_REMOVE_ONE
        if how == "poisson":
            self.event = dp_event.PoissonSampledDpEvent(opts.sample_rate, dp_event.GaussianDpEvent(z))
        elif how == "fixed_size":
            self.event = dp_event.SampledWithoutReplacementDpEvent(opts.clients, opts.per_round,
                                                                   dp_event.GaussianDpEvent(z / 2))
            relation = NeighboringRelation.REPLACE_ONE
        else:
            self.event = dp_event.GaussianDpEvent(z)
        self._acc = RdpAccountant(neighboring_relation=relation)

    def advance(self, count: int) -> None:
        """Compose releases until `count` have been accounted for."""
        if count > self.count:
            absl = logging.getLogger("absl")  # dp-accounting warns for each fractional order it drops
            level = absl.level
            absl.setLevel(logging.ERROR)
            try:
                self._acc.compose(self.event, count - self.count)
            finally:
                absl.setLevel(level)
            self.count = count

    def epsilon(self, delta: float | None = None) -> float:
        return 0.0 if self.count == 0 else float(self._acc.get_epsilon(self.opts.delta if delta is None else delta))


def epsilon(opts: DPOptions, releases: int) -> float:
    """ε(δ) of `opts`'s mechanism after `releases` rounds."""
    acc = Accountant(opts)
    acc.advance(releases)
    return acc.epsilon()


def report(opts: DPOptions, acc: Accountant, **extra) -> dict:
    """The round's `privacy` record (metrics.jsonl): the mechanism, the budget spent so far and `extra`."""
    return {"mode": opts.mode, "noise_multiplier": opts.noise_multiplier, "clipping_norm": opts.clipping_norm,
            "delta": opts.delta, "epsilon": acc.epsilon(), "releases": acc.count,
            "accounting": opts.effective_accounting, "sample_rate": opts.sample_rate, "sampled": opts.per_round,
            **extra}
