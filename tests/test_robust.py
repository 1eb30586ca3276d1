"""Poisoned updates are rejected and named; robust aggregation (median, trimmed mean, clipping) on known answers."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import record_uploads, small_cfg

from fedlora.config import MethodConfig
from fedlora.core import robust
from fedlora.core.aggregate import ClientUpdate
from fedlora.core.magdir import vector_norms
from fedlora.core.methods import build_method
from fedlora.core.server import Server
from fedlora.core.server_opt import FedAvg
from fedlora.data.federated import build_federated_data, load_examples
from fedlora.simulation import Simulation

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
KEY_AD = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.parametrizations.weight.original0"
KEY_AM = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.parametrizations.weight.original1"


# ----------------------------------------------------------------------------- poisoned updates


def _honest(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {KEY_A: torch.randn(2, 3, generator=g) * 0.1, KEY_B: torch.randn(3, 2, generator=g) * 0.1}


def test_poisoned_updates_are_rejected_and_named(caplog):
    """NaN, x1000 and wrong-shape updates: the aggregate is the honest clients' aggregate, the log names each."""
    method = build_method("fedit", MethodConfig())
    init = {KEY_A: torch.zeros(2, 3), KEY_B: torch.zeros(3, 2)}
    honest = [ClientUpdate(i, _honest(i), 5 + i) for i in range(4)]
    nan = ClientUpdate(11, {KEY_A: torch.full((2, 3), float("nan")), KEY_B: torch.ones(3, 2)}, 5)
    scaled = ClientUpdate(12, {k: v * 1000 for k, v in _honest(12).items()}, 5)  # delta from 0: x1000
    shape = ClientUpdate(13, {KEY_A: torch.ones(3, 3), KEY_B: torch.ones(3, 2)}, 5)
    server = Server(method, init, FedAvg(), {}, robust.RobustOptions(max_norm_ratio=10))
    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        report = server.aggregate([honest[0], nan, honest[1], scaled, honest[2], shape, honest[3]])
    assert report.accepted == [0, 1, 2, 3] and set(report.rejected) == {11, 12, 13}
    assert "NaN" in report.rejected[11] and "median" in report.rejected[12] and "shape" in report.rejected[13]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for cid in (11, 12, 13):
        assert f"client {cid} rejected" in logged
    reference = Server(method, init, FedAvg(), {})
    reference.aggregate(honest)
    for k in init:
        assert torch.equal(server.global_state[k], reference.global_state[k])


def test_a_diverged_client_is_rejected_with_its_reason():
    method = build_method("fedit", MethodConfig())
    init = {KEY_A: torch.zeros(2, 3), KEY_B: torch.zeros(3, 2)}
    server = Server(method, init, FedAvg(), {})
    report = server.aggregate([ClientUpdate(0, _honest(0), 4),
                               ClientUpdate(1, {}, 2, {"train_loss": float("nan"), "diverged": True})])
    assert report.accepted == [0] and "diverged" in report.rejected[1]
    assert torch.equal(server.global_state[KEY_A], _honest(0)[KEY_A])


def test_median_shrugs_off_a_scaled_update_without_screening():
    method = build_method("fedit", MethodConfig())
    init = {KEY_A: torch.zeros(2, 3), KEY_B: torch.zeros(3, 2)}
    vals = [1.0, 2.0, 3.0, 4000.0]  # the last one is a x1000 poisoner
    ups = [ClientUpdate(i, {KEY_A: torch.full((2, 3), v), KEY_B: torch.full((3, 2), -v)}, 1) for i, v in
           enumerate(vals)]
    server = Server(method, init, FedAvg(), {}, robust.RobustOptions(aggregation="median"))
    server.aggregate(ups)
    assert torch.allclose(server.global_state[KEY_A], torch.full((2, 3), 2.5))
    assert torch.allclose(server.global_state[KEY_B], torch.full((3, 2), -2.5))


def test_simulation_logs_poisoned_clients_by_name(tok, base, one_thread):
    """The in-process runtime: client 1 sends NaN, client 2 a x1000 update, client 3 a wrong shape."""
    cfg = small_cfg("method=fedit", "clients=5", "rounds=1", "max_norm_ratio=10", "eval.every=5",
                    "max_gen_examples=0")
    examples, unseen = load_examples(cfg, warn=lambda m: None)
    lines: list[str] = []
    sim = Simulation(cfg, tok, base, build_federated_data(cfg, examples, unseen), log=lines.append)
    start = {k: v.clone() for k, v in sim.server.shared_state().items()}
    honest_phase = sim.client.global_phase

    def poisoned(cid, rnd, shared, personal, rows, steps=None):
        res = honest_phase(cid, rnd, shared, personal, rows, steps)
        st = res.update.state
        if cid == 1:
            k = next(iter(st))
            st[k] = torch.full_like(st[k], float("nan"))
        elif cid == 2:
            res.update.state = {k: start[k] + 1000 * (v - start[k]) for k, v in st.items()}
        elif cid == 3:
            k = next(iter(st))
            st[k] = torch.zeros(st[k].shape[0] + 1, *st[k].shape[1:])
        return res

    seen = record_uploads(sim)
    sim.client.global_phase = poisoned
    rec = sim.run_round(1)
    assert set(rec.rejected) == {1, 2, 3}
    for cid in (1, 2, 3):
        assert any(line.startswith(f"round 1: update of client {cid} rejected") for line in lines), lines
    reference = Server(sim.method, start, FedAvg(), sim.server.axes)
    reference.aggregate([u for u in seen if u.client_id in (0, 4)])
    for k, v in reference.global_state.items():
        assert torch.equal(sim.server.global_state[k], v)


# ----------------------------------------------------------------------------- robust estimators: known answers


def _ds(*rows):
    return [{KEY_A: torch.tensor(r, dtype=torch.float32)} for r in rows]


def test_coordinate_median_known_answers():
    assert torch.equal(robust.coordinate_median(_ds([1.0, 10.0], [2.0, -5.0], [100.0, 0.0]))[KEY_A],
                       torch.tensor([2.0, 0.0]))
    assert torch.equal(robust.coordinate_median(_ds([1.0], [2.0], [3.0], [100.0]))[KEY_A], torch.tensor([2.5]))


def test_trimmed_mean_known_answers():
    ds = _ds([-100.0, 5.0], [1.0, 6.0], [2.0, 7.0], [3.0, 8.0], [100.0, -1000.0])
    assert torch.allclose(robust.trimmed_mean(ds, 0.2)[KEY_A], torch.tensor([2.0, 6.0]))  # 1 cut at each end
    assert torch.allclose(robust.trimmed_mean(ds, 0.0)[KEY_A], torch.tensor([1.2, -194.8]))
    assert torch.allclose(robust.trimmed_mean(ds, 0.1)[KEY_A], torch.tensor([1.2, -194.8]))  # floor(0.5) = 0


def test_clipping_known_answers():
    d = {KEY_A: torch.tensor([3.0, 0.0]), KEY_B: torch.tensor([4.0])}  # norm 5 over both tensors
    clipped, was = robust.clip(d, 1.0)
    assert was and torch.allclose(clipped[KEY_A], torch.tensor([0.6, 0.0])) and torch.allclose(
        clipped[KEY_B], torch.tensor([0.8]))
    same, was = robust.clip(d, 5.0)
    assert not was and torch.equal(same[KEY_A], d[KEY_A])


def test_norm_outliers_known_answers():
    assert set(robust.norm_outliers([1.0, 1.2, 0.9, 50.0], 10)) == {3}
    assert robust.norm_outliers([1.0, 9.0], 10) == {}  # lower median 1: 9 < 10
    assert set(robust.norm_outliers([1.0, 11.0], 10)) == {1}
    assert robust.norm_outliers([0.0, 0.0, 5.0], 10) == {}  # no scale to judge by


def test_server_clips_and_trims():
    method = build_method("fedit", MethodConfig())
    init = {KEY_A: torch.zeros(2), KEY_B: torch.zeros(1)}
    up = ClientUpdate(0, {KEY_A: torch.tensor([3.0, 0.0]), KEY_B: torch.tensor([4.0])}, 1)
    server = Server(method, init, FedAvg(), {}, robust.RobustOptions(clip_norm=1.0))
    report = server.aggregate([up])
    assert report.clipped == [0]
    assert torch.allclose(server.global_state[KEY_A], torch.tensor([0.6, 0.0]))
    ups = [ClientUpdate(i, {KEY_A: torch.tensor([v, -v]), KEY_B: torch.tensor([v])}, 1)
           for i, v in enumerate([1.0, 2.0, 3.0, 4.0, 1000.0])]
    server = Server(method, init, FedAvg(), {}, robust.RobustOptions(aggregation="trimmed_mean", trim_fraction=0.2))
    server.aggregate(ups)
    assert torch.allclose(server.global_state[KEY_A], torch.tensor([3.0, -3.0]))  # mean of 2, 3, 4


@pytest.mark.parametrize("aggregation,clip_norm", [("median", None), ("trimmed_mean", None), ("mean", 0.5)])
def test_directions_are_renormalized_after_robust_aggregation(aggregation, clip_norm):
    method = build_method("fedlora_opt", MethodConfig())
    axes = {"A.dir": "rows", "B.dir": "rows"}
    d0 = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    init = {KEY_AD: d0, KEY_AM: torch.ones(4)}
    g = torch.Generator().manual_seed(0)
    ups = [ClientUpdate(i, {KEY_AD: 3.0 * (d0 + 0.3 * torch.randn(4, 6, generator=g) * (i + 1)),
                            KEY_AM: torch.ones(4) + 0.1 * i}, 1) for i in range(5)]
    opts = robust.RobustOptions(aggregation=aggregation, trim_fraction=0.2, clip_norm=clip_norm)
    server = Server(method, init, FedAvg(), axes, opts)
    report = server.aggregate(ups)
    assert report.accepted == [0, 1, 2, 3, 4]
    assert torch.allclose(vector_norms(server.global_state[KEY_AD], "rows"), torch.ones(4), atol=1e-6)
    if clip_norm is None:  # median / trimmed mean of 1.0, 1.1, ..., 1.4: the middle
        assert torch.allclose(server.global_state[KEY_AM], torch.full((4,), 1.2))
    else:
        assert report.clipped == [0, 1, 2, 3, 4]


def test_robust_options_are_checked():
    for bad in ({"aggregation": "mode"}, {"trim_fraction": 0.5}, {"clip_norm": 0.0}, {"max_norm_ratio": 1.0}):
        with pytest.raises(ValueError):
            robust.RobustOptions(**bad)
    opts = robust.RobustOptions.from_config(small_cfg("aggregation=median", "clip_norm=3").federation)
    assert opts.aggregation == "median" and opts.clip_norm == 3.0 and not opts.plain
