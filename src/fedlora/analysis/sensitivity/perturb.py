"""The second reading of "sensitivity": how much the loss responds to a controlled perturbation of ONE factor's
direction or magnitude.

A factor W (lora_A [r, d_in] or lora_B [d_out, r]) is split into vectors v_i (its rows or its columns, as in
`measures`), v_i = m_i u_i with m_i = ‖v_i‖ and ‖u_i‖ = 1.

- direction only, by an angle θ:  v_i' = m_i (cos θ u_i + sin θ w_i), w_i a random unit vector orthogonal to u_i
  (a Gaussian draw, projected off u_i, normalized). Then ‖v_i'‖ = m_i and angle(v_i', v_i) = θ exactly, and
  ‖v_i' − v_i‖ = 2 sin(θ/2) m_i.
- magnitude only, by a factor 1 ± ε:  v_i' = (1 + s_i ε) v_i, s_i = ±1 drawn at random per vector. Then
  cos(v_i', v_i) = 1, ‖v_i'‖ = (1 + s_i ε) m_i and ‖v_i' − v_i‖ = ε m_i.

Matched size: both move every vector by the same distance ρ m_i, hence the same relative Frobenius change
‖ΔW‖_F / ‖W‖_F = ρ:  ε = ρ and θ = 2 arcsin(ρ / 2), 0 ≤ ρ < 1. Only the direction of the displacement
differs (along the sphere vs along the ray). ρ is relative to each factor's own size, so A (a random init) and
B (grown from zero) are compared at the same relative change; zero vectors (B at step 0) stay zero.

Loss response: Δℒ = ℒ(W + ΔW) − ℒ(W), ℒ the mean response-token cross-entropy on a fixed held-out batch, with
that factor perturbed in every LoRA layer at once and the other factor untouched. Over `draws` seeded draws
(the same draws at every snapshot): mean Δℒ, its standard deviation, and the sensitivity S = mean |Δℒ|. The
ratios comparable with the paper's are S_dir(A) / S_dir(B) (paper 1.7) and S_mag(B) / S_mag(A) (paper 41).
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import Tensor

from .measures import AXES, EPS, _check_axis, parse_lora_name
from .report import _ratio

MODES = ("direction", "magnitude")
RESPONSE = (
    "Δℒ = held-out response loss with one factor perturbed in every layer minus the unperturbed loss; direction: "
    "each vector rotated by θ = 2·arcsin(ρ/2) towards a random orthogonal direction (norm kept); magnitude: each "
    "vector's norm scaled by 1 ± ρ (random sign, direction kept); both move each vector by ρ·‖v‖, so "
    "‖ΔW‖_F/‖W‖_F = ρ. S = mean |Δℒ| over the draws."
)


def matched_sizes(rho: float) -> tuple[float, float]:
    """(θ, ε) that move every vector by ρ·‖v‖: θ = 2 arcsin(ρ/2), ε = ρ."""
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must be in [0, 1) (got {rho})")
    return 2.0 * math.asin(rho / 2.0), rho


def _vectors(w: Tensor, axis: str) -> Tensor:
    """The vectors of `w` as the rows of a float64 matrix (a transposed copy for axis "cols")."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    v = w.detach().to(torch.float64)
    return v if _check_axis(axis) == 1 else v.T


def _back(v: Tensor, like: Tensor, axis: str) -> Tensor:
    return (v if axis == "rows" else v.T).to(dtype=like.dtype, device=like.device).contiguous()


def rotate(w: Tensor, axis: str, theta: float, gen: torch.Generator) -> Tensor:
    """Every vector of `w` turned by exactly θ towards a random orthogonal direction; every norm kept."""
    v = _vectors(w, axis)
    if v.shape[1] < 2:
        raise ValueError(f"a {v.shape[1]}-entry vector has no orthogonal direction to turn towards")
    m = v.norm(dim=1, keepdim=True)
    u = v / m.clamp_min(EPS)
    g = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.device)
    g = g - (g * u).sum(dim=1, keepdim=True) * u
    g = g - (g * u).sum(dim=1, keepdim=True) * u  # twice: orthogonal to rounding error
    ortho = g / g.norm(dim=1, keepdim=True).clamp_min(EPS)
    return _back(m * (math.cos(theta) * u + math.sin(theta) * ortho), w, axis)


def rescale(w: Tensor, axis: str, eps: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(`w` with vector i scaled by 1 + s_i ε, s_i = ±1 at random; the factors 1 + s_i ε)."""
    v = _vectors(w, axis)
    signs = torch.randint(0, 2, (v.shape[0],), generator=gen).to(torch.float64) * 2 - 1
    factors = 1.0 + signs.to(v.device) * eps
    return _back(v * factors[:, None], w, axis), factors


def perturb(w: Tensor, mode: str, axis: str, rho: float, gen: torch.Generator) -> Tensor:
    """`w` with only its direction (mode "direction") or only its magnitude ("magnitude") changed, at size ρ."""
    theta, eps = matched_sizes(rho)
    if mode == "direction":
        return rotate(w, axis, theta, gen)
    if mode == "magnitude":
        return rescale(w, axis, eps, gen)[0]
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def heldout_loss(am, batches: list[dict[str, Tensor]]) -> float:
    """Mean response-token cross-entropy of `am` over the collated held-out micro-batches (eval mode, no grad)."""
    from ...training import response_loss

    was_training = am.model.training
    am.model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            loss_sum, n = response_loss(am, b)
            total, tokens = total + float(loss_sum), tokens + n
    am.model.train(was_training)
    if tokens == 0:
        raise ValueError("the held-out batch has no response tokens")
    return total / tokens


def _factor_names(params: dict[str, Tensor]) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {"A": [], "B": []}
    for n in sorted(params):
        parsed = parse_lora_name(n)
        if parsed is not None:
            names[parsed[1]].append(n)
    return names


def _draw_seed(seed: int, *key: int) -> int:
    out = int(seed) & 0xFFFFFFFF
    for k in key:
        out = (out * 1_000_003 + k + 1) & 0x7FFFFFFFFFFFFFFF
    return out


def loss_response(am, batches: list[dict[str, Tensor]], *, rho: float, draws: int, seed: int,
                  axes: tuple[str, ...] = AXES) -> dict:
    """Δℒ of each (factor, axis, mode) perturbation over `draws` seeded draws; the weights are restored after each.

    Returns {"base_loss", "rho", "draws", "records": [{factor, axis, mode, deltas, mean, std, sensitivity}]},
    sensitivity = mean |Δℒ|, std the sample standard deviation over draws (NaN for one draw).
    """
    if draws < 1:
        raise ValueError(f"draws must be at least 1 (got {draws})")
    matched_sizes(rho)
    names = _factor_names(am.params)
    if not names["A"] or not names["B"]:
        raise ValueError("the adapter holds no lora_A / lora_B weights")
    base = heldout_loss(am, batches)
    records = []
    for fi, factor in enumerate(("A", "B")):
        for ai, axis in enumerate(axes):
            _check_axis(axis)
            for mi, mode in enumerate(MODES):
                deltas = []
                for d in range(draws):
                    gen = torch.Generator().manual_seed(_draw_seed(seed, fi, ai, mi, d))
                    saved = {n: am.params[n].detach().clone() for n in names[factor]}
                    try:
                        with torch.no_grad():
                            for n in names[factor]:
                                am.params[n].copy_(perturb(saved[n], mode, axis, rho, gen))
                        deltas.append(heldout_loss(am, batches) - base)
                    finally:
                        with torch.no_grad():
                            for n, t in saved.items():
                                am.params[n].copy_(t)
                records.append({
                    "factor": factor, "axis": axis, "mode": mode, "deltas": deltas,
                    "mean": sum(deltas) / len(deltas),
                    "std": statistics.stdev(deltas) if len(deltas) > 1 else math.nan,
                    "sensitivity": sum(abs(x) for x in deltas) / len(deltas),
                })
    return {"base_loss": base, "rho": rho, "draws": draws, "records": records}


def response_ratios(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per axis: S of each (factor, mode) and the paper-comparable ratios S_dir(A)/S_dir(B), S_mag(B)/S_mag(A).

    `records` may hold several groups' records of one axis/factor/mode; their sensitivities are averaged first.
    """
    out: dict[str, dict[str, float]] = {}
    for axis in [a for a in AXES if any(r["axis"] == a for r in records)]:
        s = {}
        for factor in ("A", "B"):
            for mode in MODES:
                vals = [r["sensitivity"] for r in records
                        if (r["axis"], r["factor"], r["mode"]) == (axis, factor, mode)]
                s[f"S_{mode[:3]}_{factor}"] = sum(vals) / len(vals) if vals else math.nan
        s["a_dir_over_b_dir"] = _ratio(s["S_dir_A"], s["S_dir_B"])
        s["b_mag_over_a_mag"] = _ratio(s["S_mag_B"], s["S_mag_A"])
        out[axis] = s
    return out

