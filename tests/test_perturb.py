"""The second reading of sensitivity: direction-only and magnitude-only perturbations at matched size, and the loss
response on the tiny model."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

from fedlora.adapters import AdapterModel  # noqa: E402
from fedlora.analysis.sensitivity.perturb import (  # noqa: E402
    loss_response,
    matched_sizes,
    perturb,
    rescale,
    response_ratios,
    rotate,
)
from fedlora.config import load_config  # noqa: E402
from fedlora.data.examples import Example  # noqa: E402
from fedlora.data.prompts import PromptFormatter  # noqa: E402
from fedlora.training import collate  # noqa: E402


def _vecs(w, axis):
    return w.double() if axis == "rows" else w.double().T


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_rotate_keeps_every_norm_and_turns_every_vector_by_theta(axis):
    w = torch.randn(7, 5, dtype=torch.float64)
    theta = 0.3
    out = rotate(w, axis, theta, torch.Generator().manual_seed(1))
    v, o = _vecs(w, axis), _vecs(out, axis)
    assert torch.allclose(o.norm(dim=1), v.norm(dim=1), rtol=0, atol=1e-6)
    cos = (v * o).sum(1) / (v.norm(dim=1) * o.norm(dim=1))
    assert torch.allclose(torch.arccos(cos.clamp(-1, 1)), torch.full_like(cos, theta), atol=1e-6)
    # the turning directions are random: another draw gives another matrix, the same draw the same one
    assert not torch.allclose(out, rotate(w, axis, theta, torch.Generator().manual_seed(2)))
    assert torch.equal(out, rotate(w, axis, theta, torch.Generator().manual_seed(1)))


def test_rotate_in_float32_and_zero_vectors():
    w = torch.randn(4, 16)
    w[2] = 0
    out = rotate(w, "rows", 0.1, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), w.norm(dim=1), rtol=1e-6, atol=0)
    assert torch.equal(out[2], torch.zeros(16))  # a zero vector has no direction: it stays zero


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_rescale_keeps_every_direction_and_scales_by_one_plus_or_minus_eps(axis):
    w = torch.randn(6, 9, dtype=torch.float64)
    out, factors = rescale(w, axis, 0.2, torch.Generator().manual_seed(3))
    v, o = _vecs(w, axis), _vecs(out, axis)
    cos = (v * o).sum(1) / (v.norm(dim=1) * o.norm(dim=1))
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-12)
    assert set(factors.tolist()) <= {0.8, 1.2} and len(factors) == v.shape[0]
    assert torch.allclose(o.norm(dim=1), v.norm(dim=1) * factors, atol=1e-12)


@pytest.mark.parametrize("rho", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_matched_sizes_move_every_vector_by_the_same_distance(rho, axis):
    w = torch.randn(8, 12, dtype=torch.float64)
    d_dir = _vecs(perturb(w, "direction", axis, rho, torch.Generator().manual_seed(0)) - w, axis)
    d_mag = _vecs(perturb(w, "magnitude", axis, rho, torch.Generator().manual_seed(0)) - w, axis)
    expected = rho * _vecs(w, axis).norm(dim=1)
    assert torch.allclose(d_dir.norm(dim=1), expected, atol=1e-10)
    assert torch.allclose(d_mag.norm(dim=1), expected, atol=1e-10)
    assert d_dir.norm() / w.norm() == pytest.approx(rho, rel=1e-10)
    assert d_mag.norm() / w.norm() == pytest.approx(rho, rel=1e-10)
    theta, eps = matched_sizes(rho)
    assert eps == rho and 2 * math.sin(theta / 2) == pytest.approx(rho, rel=1e-12)


def test_bad_sizes_and_modes():
    w = torch.randn(3, 4)
    for rho in (-0.1, 1.0):
        with pytest.raises(ValueError, match="rho"):
            matched_sizes(rho)
    with pytest.raises(ValueError, match="mode"):
        perturb(w, "angle", "rows", 0.1, torch.Generator())
    with pytest.raises(ValueError, match="orthogonal"):
        rotate(torch.randn(3, 1), "rows", 0.1, torch.Generator())


def _adapter_and_batches(tok):
    cfg = load_config(None, ["lora.dropout=0.0"])
    am = AdapterModel(tiny_model(len(tok)), "lora", cfg.lora, seed=0)
    with torch.no_grad():  # B away from zero, as after some training
        for n, p in am.params.items():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    fmt = PromptFormatter(tok, "plain", 64)
    encoded = [fmt.encode(Example(f"Say {i}.", "", f"the number {i} twice {i}", "x")) for i in range(6)]
    return am, [collate(encoded[:3], tok.pad_token_id, am.device), collate(encoded[3:], tok.pad_token_id, am.device)]


def test_loss_response_is_zero_at_zero_size_and_restores_the_weights():
    tok = tiny_tokenizer()
    am, batches = _adapter_and_batches(tok)
    before = {n: p.detach().clone() for n, p in am.params.items()}
    zero = loss_response(am, batches, rho=0.0, draws=2, seed=0)
    assert len(zero["records"]) == 2 * 2 * 2  # factor x axis x mode
    assert all(x == pytest.approx(0.0, abs=1e-7) for r in zero["records"] for x in r["deltas"])
    resp = loss_response(am, batches, rho=0.3, draws=3, seed=0)
    assert all(torch.equal(before[n], p) for n, p in am.params.items())
    assert resp["base_loss"] == pytest.approx(zero["base_loss"], abs=0)
    for r in resp["records"]:
        assert len(r["deltas"]) == 3 and r["sensitivity"] > 0 and r["std"] >= 0
        assert r["sensitivity"] == pytest.approx(sum(abs(x) for x in r["deltas"]) / 3)
    # seeded: the same seed gives the same numbers, another seed other draws
    again = loss_response(am, batches, rho=0.3, draws=3, seed=0)
    assert [r["deltas"] for r in again["records"]] == [r["deltas"] for r in resp["records"]]
    other = loss_response(am, batches, rho=0.3, draws=3, seed=1)
    assert [r["deltas"] for r in other["records"]] != [r["deltas"] for r in resp["records"]]
    ratios = response_ratios(resp["records"])
    for axis in ("rows", "cols"):
        s = ratios[axis]
        assert s["a_dir_over_b_dir"] == pytest.approx(s["S_dir_A"] / s["S_dir_B"])
        assert s["b_mag_over_a_mag"] == pytest.approx(s["S_mag_B"] / s["S_mag_A"])
