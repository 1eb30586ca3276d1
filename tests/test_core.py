import torch
import pytest

from fedlora.config import LoraConfig, MethodConfig
from fedlora.core.aggregate import ClientUpdate, direction_aware_mean, weighted_mean
from fedlora.core.components import component_of, join, split
from fedlora.core.magdir import compose, unit, vector_norms
from fedlora.core.methods import build_method
from fedlora.core.server import Server
from fedlora.core.server_opt import FedAdam, FedAvg, FedAvgM, FedYogi

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"


def test_fedavg_weights_by_examples_trained():
    s1 = {KEY_A: torch.zeros(2, 3)}
    s2 = {KEY_A: torch.ones(2, 3)}
    m = weighted_mean([s1, s2], [1, 3])
    assert torch.allclose(m[KEY_A], torch.full((2, 3), 0.75))
    method = build_method("fedit", MethodConfig())
    init = {KEY_A: torch.zeros(2, 3), KEY_B: torch.zeros(3, 2)}
    server = Server(method, init, FedAvg(), {})
    ups = [ClientUpdate(0, {KEY_A: torch.ones(2, 3), KEY_B: torch.ones(3, 2)}, 10),
           ClientUpdate(1, {KEY_A: torch.full((2, 3), 3.0), KEY_B: torch.full((3, 2), 3.0)}, 30)]
    report = server.aggregate(ups)
    assert report.accepted == [0, 1] and report.num_examples == 40
    assert torch.allclose(server.global_state[KEY_A], torch.full((2, 3), 2.5))


def test_server_rejects_malformed_updates_and_aggregates_the_rest():
    method = build_method("fedit", MethodConfig())
    init = {KEY_A: torch.zeros(2, 3), KEY_B: torch.zeros(3, 2)}
    server = Server(method, init, FedAvg(), {})
    good = ClientUpdate(0, {KEY_A: torch.ones(2, 3), KEY_B: torch.ones(3, 2)}, 5)
    nan = ClientUpdate(1, {KEY_A: torch.full((2, 3), float("nan")), KEY_B: torch.ones(3, 2)}, 5)
    shape = ClientUpdate(2, {KEY_A: torch.ones(3, 3), KEY_B: torch.ones(3, 2)}, 5)
    keys = ClientUpdate(3, {KEY_A: torch.ones(2, 3)}, 5)
    report = server.aggregate([good, nan, shape, keys])
    assert report.accepted == [0]
    assert set(report.rejected) == {1, 2, 3}
    assert "NaN" in report.rejected[1] and "shape" in report.rejected[2] and "missing" in report.rejected[3]
    assert torch.equal(server.global_state[KEY_A], torch.ones(2, 3))


@pytest.mark.parametrize("opt", [FedAvgM(lr=1.0, momentum=0.0), FedAdam(lr=0.1), FedYogi(lr=0.1)])
def test_server_optimizers_move_towards_the_aggregate(opt):
    cur = {KEY_A: torch.zeros(4)}
    new = opt.step(cur, {KEY_A: torch.ones(4)})
    assert (new[KEY_A] > 0).all()
    if isinstance(opt, FedAvgM):
        assert torch.allclose(new[KEY_A], torch.ones(4))


def test_magdir_compose_roundtrip_and_axes():
    w = torch.randn(4, 6)
    for axis in ("rows", "cols"):
        d, m = unit(w, axis), vector_norms(w, axis)
        assert torch.allclose(compose(d, m, axis), w, atol=1e-6)
        assert torch.allclose(vector_norms(d, axis), torch.ones_like(m), atol=1e-6)
    assert vector_norms(w, "rows").shape == (4,) and vector_norms(w, "cols").shape == (6,)


def test_only_the_components_with_a_norm_axis_are_averaged_as_directions():
    b_dir = KEY_B.replace("lora_B.default.weight", "lora_B.default.parametrizations.weight.original0")
    s1, s2 = {b_dir: torch.tensor([[3.0, 4.0]])}, {b_dir: torch.tensor([[0.0, 1.0]])}
    unit_mean = direction_aware_mean([s1, s2], [1, 1], {"B.dir": "rows"})[b_dir]
    assert torch.allclose(unit_mean, unit(torch.tensor([[0.3, 0.9]]), "rows"))  # each made unit first, then the mean
    free_mean = direction_aware_mean([s1, s2], [1, 1], {})[b_dir]  # a free B (b_direction="free"): no norm axis
    assert torch.allclose(free_mean, torch.tensor([[1.5, 2.5]]))


def test_component_names_and_split_join_roundtrip():
    state = {KEY_A: torch.randn(2, 3), KEY_B: torch.randn(3, 2)}
    parts = split(state)
    assert set(parts) == {"A", "B"}
    assert join(*parts.values()).keys() == state.keys()
    assert component_of(KEY_A.replace("lora_A.default.weight", "lora_B.default.parametrizations.weight.original1")) \
        == "B.mag"
    with pytest.raises(KeyError):
        component_of("model.embed_tokens.weight")


def test_policies_declare_what_they_share():
    # explicit: not the defaults' business
    o = MethodConfig(share_b_mag=False, personal_mode="persist", pipeline="sequential")
    opt = build_method("fedlora_opt", o)
    assert "B.mag" not in opt.shared and "B.mag" in opt.personal and set(opt.local_train) == {"B.mag"}
    assert "A.dir" in opt.shared
    assert build_method("fedsa", o).shared == {"A"}
    assert build_method("ffa", o).frozen == {"A"}
    with pytest.raises(ValueError, match="needs a global value"):
        build_method("fedlora_opt", MethodConfig(personal_mode="reset", share_b_mag=False))
    assert build_method("fedlora_opt", MethodConfig(personal_mode="reset", pipeline="sequential")).personal_mode == "reset"
