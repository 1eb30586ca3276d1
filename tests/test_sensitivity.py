import math

import pytest
import torch

from fedlora.analysis.sensitivity import (
    decompose,
    direction_change,
    magnitude_change,
    measure_snapshots,
    parse_lora_name,
    relative_magnitude_change,
    summarize,
    write_report,
)

APPROX = dict(rel=1e-9, abs=1e-12)


def test_decompose_shapes_and_reconstruction():
    w = torch.randn(5, 3)
    m, d = decompose(w, "rows")
    assert m.shape == (5,) and d.shape == (5, 3)
    assert torch.allclose(m[:, None] * d, w.double())
    assert torch.allclose(d.norm(dim=1), torch.ones(5, dtype=torch.float64))
    m, d = decompose(w, "cols")
    assert m.shape == (3,)
    assert torch.allclose(m[None, :] * d, w.double())
    m, d = decompose(torch.zeros(2, 4), "rows")
    assert not torch.isnan(d).any() and (m == 0).all()
    with pytest.raises(ValueError):
        decompose(w, "diag")


def test_scaling_a_row_changes_magnitude_not_direction():
    w0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # row norms 5, 1
    wt = w0.clone()
    wt[0] *= 2.0  # norm 5 -> 10
    assert direction_change(w0, wt, "rows") == pytest.approx(0.0, abs=1e-12)
    assert magnitude_change(w0, wt, "rows") == pytest.approx((5 + 0) / 2, **APPROX)
    assert relative_magnitude_change(w0, wt, "rows") == pytest.approx((1.0 + 0) / 2, **APPROX)


def test_rotation_changes_direction_not_magnitude():
    theta = 0.7
    c, s = math.cos(theta), math.sin(theta)
    w0 = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    wt = w0 @ rot.T  # every row rotated by theta, norms kept
    assert direction_change(w0, wt, "rows") == pytest.approx(1 - c, **APPROX)
    assert magnitude_change(w0, wt, "rows") == pytest.approx(0.0, abs=1e-12)
    assert relative_magnitude_change(w0, wt, "rows") == pytest.approx(0.0, abs=1e-12)
    # opposite direction: 1 - cos(pi) = 2
    assert direction_change(w0, -w0, "rows") == pytest.approx(2.0, **APPROX)


def test_rows_and_cols_differ():
    w0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    wt = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # rows: row 0 goes from (1,0) to (1,1): 45 degrees; row 1 unchanged
    assert direction_change(w0, wt, "rows") == pytest.approx((1 - math.cos(math.pi / 4)) / 2, **APPROX)
    assert magnitude_change(w0, wt, "rows") == pytest.approx((math.sqrt(2) - 1) / 2, **APPROX)
    # cols: col 1 goes from (0,1) to (1,1); col 0 unchanged
    assert direction_change(w0, wt, "cols") == pytest.approx((1 - math.cos(math.pi / 4)) / 2, **APPROX)
    # scaling a row is a pure magnitude change along rows, but turns every column
    w2 = torch.ones(2, 2)
    wt2 = torch.tensor([[2.0, 2.0], [1.0, 1.0]])
    assert direction_change(w2, wt2, "rows") == pytest.approx(0.0, abs=1e-12)
    assert magnitude_change(w2, wt2, "rows") == pytest.approx(math.sqrt(2) / 2, **APPROX)
    assert direction_change(w2, wt2, "cols") == pytest.approx(1 - 3 / math.sqrt(10), **APPROX)
    assert magnitude_change(w2, wt2, "cols") == pytest.approx(math.sqrt(5) - math.sqrt(2), **APPROX)
    assert magnitude_change(w0, wt.T, "rows") == pytest.approx(magnitude_change(w0, wt, "cols"), **APPROX)


def test_zero_vectors_have_no_direction():
    w0 = torch.zeros(2, 3)
    wt = torch.ones(2, 3)
    assert math.isnan(direction_change(w0, wt, "rows"))
    assert magnitude_change(w0, wt, "rows") == pytest.approx(math.sqrt(3), **APPROX)
    # a zero row is left out; the other row counts
    w0 = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    wt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert direction_change(w0, wt, "rows") == pytest.approx(1.0, **APPROX)


def test_parse_lora_name():
    n = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert parse_lora_name(n) == ("base_model.model.model.layers.0.self_attn.q_proj", "A", "q_proj")
    assert parse_lora_name("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight")[1:] == ("B", "down_proj")
    assert parse_lora_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") is None


def name(layer, kind, factor):
    return f"base_model.model.model.layers.{layer}.self_attn.{kind}.lora_{factor}.default.weight"


def fake_snapshots():
    """Two q_proj layers, r=1, d_in=2, d_out=2.

    A (rows): layer 0 stays put then is rotated by 90 degrees (ΔD 1) at fixed norm 1;
    layer 1 is scaled from norm 1 to 3 (ΔM 2) keeping its direction.
    B starts at zero; at step 10 B = [[1],[1]] (the reference); at step 20 layer 0's B
    is [[2],[2]] (same direction, norms 2) and layer 1's B is [[1],[-1]] (row 1 flipped).
    """
    a0 = torch.tensor([[1.0, 0.0]])
    zero_b = torch.zeros(2, 1)
    ones_b = torch.ones(2, 1)
    s0 = {name(0, "q_proj", "A"): a0, name(1, "q_proj", "A"): a0, name(0, "q_proj", "B"): zero_b,
          name(1, "q_proj", "B"): zero_b, "base_model.model.lm_head.weight": torch.ones(3, 3)}
    s10 = {name(0, "q_proj", "A"): a0, name(1, "q_proj", "A"): a0, name(0, "q_proj", "B"): ones_b,
           name(1, "q_proj", "B"): ones_b}
    s20 = {name(0, "q_proj", "A"): torch.tensor([[0.0, 1.0]]), name(1, "q_proj", "A"): torch.tensor([[3.0, 0.0]]),
           name(0, "q_proj", "B"): 2 * ones_b, name(1, "q_proj", "B"): torch.tensor([[1.0], [-1.0]])}
    return [(20, s20), (0, s0), (10, s10)]  # order does not matter


def pick(records, step, factor, axis, layer_type="q_proj"):
    (r,) = [r for r in records if (r["step"], r["factor"], r["axis"], r["layer_type"]) == (step, factor, axis, layer_type)]
    return r


def test_measure_snapshots_expected_averages():
    records = measure_snapshots(fake_snapshots(), group="g")
    assert len(records) == 3 * 2 * 2  # steps x factors x axes (one layer type)
    for r in records:
        assert all(not math.isnan(r[k]) for k in ("delta_direction", "delta_magnitude", "relative_delta_magnitude"))
        assert r["num_layers"] == 2 and r["group"] == "g"

    a = pick(records, 20, "A", "rows")
    assert a["delta_direction"] == pytest.approx((1.0 + 0.0) / 2, **APPROX)
    assert a["delta_magnitude"] == pytest.approx((0.0 + 2.0) / 2, **APPROX)
    assert a["relative_delta_magnitude"] == pytest.approx((0.0 + 2.0) / 2, **APPROX)
    assert a["reference_step"] == 0

    # B: zero at step 0 -> nothing measured yet, no NaN
    b0 = pick(records, 0, "B", "rows")
    assert (b0["delta_direction"], b0["delta_magnitude"], b0["relative_delta_magnitude"]) == (0.0, 0.0, 0.0)
    b10 = pick(records, 10, "B", "rows")
    assert b10["delta_direction"] == 0.0 and b10["reference_step"] == 10
    assert b10["delta_magnitude"] == pytest.approx(1.0, **APPROX)  # initial norm 0: ΔM = norm
    b20 = pick(records, 20, "B", "rows")
    # rows of B (r=1): layer 0 rows keep direction; layer 1 row 1 flips (1 - cos = 2) -> (0 + (0+2)/2)/2
    assert b20["delta_direction"] == pytest.approx(0.5, **APPROX)
    assert b20["delta_magnitude"] == pytest.approx((2.0 + 1.0) / 2, **APPROX)  # mean norms: 2 and 1
    # relative to the step-10 reference (norm 1 each row): layer 0: 1, layer 1: 0
    assert b20["relative_delta_magnitude"] == pytest.approx(0.5, **APPROX)
    # cols of B: one column; layer 0 keeps direction, layer 1 (1,1)->(1,-1) is orthogonal: (0 + 1)/2
    assert pick(records, 20, "B", "cols")["delta_direction"] == pytest.approx(0.5, **APPROX)
    assert pick(records, 20, "B", "cols")["delta_magnitude"] == pytest.approx((2 * math.sqrt(2) + math.sqrt(2)) / 2, **APPROX)


def test_b_reference_step_and_b_that_never_moves():
    records = measure_snapshots(fake_snapshots(), axes=("rows",), b_reference_step=20)
    assert pick(records, 20, "B", "rows")["delta_direction"] == pytest.approx(0.0, abs=1e-12)
    assert pick(records, 10, "B", "rows")["delta_direction"] == pytest.approx(0.5, **APPROX)  # symmetric
    with pytest.raises(ValueError):
        measure_snapshots(fake_snapshots(), b_reference_step=5)

    snaps = [(s, {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in p.items()}) for s, p in fake_snapshots()]
    records = measure_snapshots(snaps)
    for r in records:
        if r["factor"] == "B":
            assert (r["delta_direction"], r["delta_magnitude"], r["relative_delta_magnitude"]) == (0.0, 0.0, 0.0)
            assert r["reference_step"] is None
    s = summarize(records)
    assert math.isnan(s["axes"]["rows"]["a_dir_over_b_dir"])


def test_measure_snapshots_errors():
    with pytest.raises(ValueError):
        measure_snapshots([])
    with pytest.raises(ValueError, match="no LoRA weights"):
        measure_snapshots([(0, {"x.weight": torch.ones(2, 2)})])
    snaps = fake_snapshots()
    del snaps[0][1][name(0, "q_proj", "A")]
    with pytest.raises(ValueError, match="step 20 lacks"):
        measure_snapshots(snaps)


def test_summarize_ratios():
    snaps = fake_snapshots()
    snaps[0][1][name(0, "v_proj", "A")] = torch.tensor([[0.0, 1.0]])
    for _, p in snaps[1:]:
        p[name(0, "v_proj", "A")] = torch.tensor([[1.0, 0.0]])
    for s, p in snaps:
        p[name(0, "v_proj", "B")] = torch.zeros(2, 1) if s == 0 else torch.ones(2, 1)
    records = measure_snapshots(snaps, group="qa")
    s = summarize(records)
    assert s["group"] == "qa" and s["step"] == 20 and s["paper"]["b_mag_over_a_mag"] == 41.0
    rows = s["axes"]["rows"]
    # A rows at step 20: q layer 0 ΔD 1, q layer 1 ΔD 0, v layer 0 ΔD 1 -> mean over 3 layers 2/3
    assert rows["delta_direction_A"] == pytest.approx(2 / 3, **APPROX)
    # B rows: q layers 0 and 1 (ΔD 0 and 1), v layer 0 (0) -> 1/3
    assert rows["delta_direction_B"] == pytest.approx(1 / 3, **APPROX)
    assert rows["a_dir_over_b_dir"] == pytest.approx(2.0, **APPROX)
    # ΔM_A: 0, 2, 0 -> 2/3; ΔM_B: 2, 1, 1 -> 4/3
    assert rows["b_mag_over_a_mag"] == pytest.approx((4 / 3) / (2 / 3), **APPROX)
    assert set(s["by_layer_type"]) == {"q_proj", "v_proj"}
    assert s["by_layer_type"]["q_proj"]["rows"]["a_dir_over_b_dir"] == pytest.approx(1.0, **APPROX)
    assert set(s["axes"]) == {"rows", "cols"}

    mixed = records + measure_snapshots(fake_snapshots(), group="sum")
    with pytest.raises(ValueError, match="several groups"):
        summarize(mixed)
    assert summarize(mixed, group="sum")["group"] == "sum"


def test_write_report(tmp_path):
    records = measure_snapshots(fake_snapshots(), group="qa") + measure_snapshots(fake_snapshots(), group="summ")
    paths = write_report(records, tmp_path / "out", "QA vs summarization")
    names = [p.name for p in paths]
    assert names == [
        "sensitivity_QA_vs_summarization.md",
        "sensitivity_QA_vs_summarization_rows.png",
        "sensitivity_QA_vs_summarization_cols.png",
    ]
    md = paths[0].read_text()
    assert "A-dir : B-dir" in md and "| qa | rows |" in md and "| summ | B | q_proj | cols |" in md
    for p in paths[1:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
