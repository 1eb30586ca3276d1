"""The invariant that defines each method, on the tiny model with real Dolly rows."""

import pytest
import torch
from conftest import record_uploads, small_cfg
from peft import PeftModel

from fedlora.core.components import component_of, select
from fedlora.core.magdir import vector_norms
from fedlora.data.federated import build_federated_data, load_examples
from fedlora.simulation import Simulation


def make_sim(tok, base, method, *overrides):
    cfg = small_cfg(f"method={method}", *overrides)
    examples, unseen = load_examples(cfg, warn=lambda m: None)
    data = build_federated_data(cfg, examples, unseen)
    return Simulation(cfg, tok, base, data, log=lambda m: None)


def components(state):
    return {component_of(k) for k in state}


def test_ffa_a_is_bit_identical(tok, base):
    sim = make_sim(tok, base, "ffa", "rounds=3")
    a0 = select(sim.server.global_state, {"A"})
    ups = record_uploads(sim)
    sim.run()
    for k, v in a0.items():
        assert torch.equal(sim.server.global_state[k], v)
    assert all(components(u.state) == {"B"} for u in ups)
    b0 = select(sim.am.init_state, {"B"})
    assert any(not torch.equal(sim.server.global_state[k], v) for k, v in b0.items())


def test_fedsa_never_uploads_b(tok, base):
    sim = make_sim(tok, base, "fedsa")
    ups = record_uploads(sim)
    sim.run()
    assert ups and all(components(u.state) == {"A"} for u in ups)
    b = [select(sim.personal[c], {"B"}) for c in range(3)]
    k = next(iter(b[0]))
    assert not torch.equal(b[0][k], b[1][k])


def test_fedlora_opt_default_has_a_global_b_mag_and_a_personal_offset(tok, base):
    """The default: the server holds a global B.mag (so its global model is not the base model); each client's
    personal B.mag is the new global B.mag plus a personal offset that persists and never travels."""
    sim = make_sim(tok, base, "fedlora_opt", "rounds=2")
    ups = record_uploads(sim)
    x = torch.tensor([[5, 6, 7, 8, 9]])
    sim.am.load_state(sim.am.init_state)
    base_logits = sim.am.model(x).logits.clone()
    sim.run()
    assert ups and all(components(u.state) == {"A.dir", "A.mag", "B.dir", "B.mag"} for u in ups)
    g = sim.server.global_state
    init = sim.am.init_state
    assert all(torch.equal(v, torch.ones_like(v)) for v in select(init, {"B.mag"}).values())  # free B: gains of 1
    assert any(not torch.equal(v, init[k]) for k, v in select(g, {"B.mag"}).items())  # a trained global B.mag
    sim.am.load_state(g)
    assert not torch.allclose(sim.am.model(x).logits, base_logits)  # the server's global model: delta W != 0
    # personal state = offsets from the global B.mag, different per client; local model = global + offset
    p = sim.personal
    key = next(iter(p[0]))
    assert {component_of(k) for k in p[0]} == {"B.mag"}
    assert not torch.equal(p[0][key], p[1][key])
    local = sim.local_state(0)
    assert torch.allclose(local[key], g[key] + p[0][key])
    assert all(torch.equal(local[k], g[k]) for k in g if component_of(k) != "B.mag")
    # the offset persists: after another round's global step, the client's B.mag still carries it
    before = {k: v.clone() for k, v in p[0].items()}
    sim.cfg.federation.rounds = 3
    sim.run(start_round=3)
    assert not torch.equal(sim.personal[0][key], before[key])  # trained further from the kept offset


def test_fedlora_opt_reset_mode_restarts_from_the_global_b_mag(tok, base):
    sim = make_sim(tok, base, "fedlora_opt", "rounds=1", "personal_mode=reset", "pipeline=sequential",
                   "personal_steps=0")
    sim.run()
    # no local steps: the local model is exactly the global model
    assert all(torch.equal(sim.local_state(0)[k], v) for k, v in sim.server.global_state.items())


def test_fedlora_opt_without_global_b_mag_keeps_it_personal(tok, base):
    """share_b_mag=false, personal_mode=persist: B.mag never travels; the global model has B.mag = 0 (the base)."""
    sim = make_sim(tok, base, "fedlora_opt", "rounds=1", "share_b_mag=false", "personal_mode=persist",
                   "pipeline=sequential", "b_direction=unit")
    ups = record_uploads(sim)
    sim.run()
    assert all(torch.count_nonzero(v) == 0 for v in select(sim.server.global_state, {"B.mag"}).values())
    # never uploads B.mag
    assert ups and all("B.mag" not in components(u.state) for u in ups)
    assert all(components(u.state) == {"A.dir", "A.mag", "B.dir"} for u in ups)
    # personal B.mag differs between clients after training
    p = sim.personal
    key = next(iter(p[0]))
    assert component_of(key) == "B.mag"
    assert not torch.equal(p[0][key], p[1][key])
    # aggregated direction rows: the weighted mean of the clients' unit directions, re-normalized, with the
    # clients' mean stored norm (direction_scale=keep, the default); unit norm with direction_scale=unit
    from fedlora.core.magdir import unit

    for k, v in select(sim.server.global_state, {"A.dir", "B.dir"}).items():
        w = [u.num_examples for u in ups]
        mean_dir = unit(sum(wi * unit(u.state[k], "rows") for wi, u in zip(w, ups)), "rows")
        mean_norm = sum(wi * vector_norms(u.state[k], "rows") for wi, u in zip(w, ups)) / sum(w)
        assert torch.allclose(unit(v, "rows"), mean_dir, atol=1e-5)
        assert torch.allclose(vector_norms(v, "rows"), mean_norm, atol=1e-5)
    # persists across rounds: round 2 starts from the kept value, and the local phase changes only B.mag
    before = {c: {k: v.clone() for k, v in p[c].items()} for c in p}
    shared = sim.server.shared_state()
    new_personal, _ = sim.client.local_phase(0, 2, shared, before[0], sim.train_rows[0])
    assert not torch.equal(new_personal[key], before[0][key])
    after = sim.am.state()
    start = sim.client.full_global_state(shared)
    for k, v in after.items():
        if component_of(k) != "B.mag":
            assert torch.equal(v, start[k]), k
    sim.cfg.federation.rounds = 2
    sim.run(start_round=2)
    for c in range(3):
        assert not torch.equal(sim.personal[c][key], before[c][key])  # kept and trained further


def test_fedlora_opt_with_b_dir_kept_home_uploads_only_a(tok, base):
    sim = make_sim(tok, base, "fedlora_opt", "rounds=2", "share_b_dir=false", "share_b_mag=false",
                   "personal_mode=persist", "pipeline=sequential")
    ups = record_uploads(sim)
    sim.run()
    assert ups and all(components(u.state) == {"A.dir", "A.mag"} for u in ups)
    assert components(sim.server.shared_state()) == {"A.dir", "A.mag"}
    # each client's B direction and magnitude stay on the client and differ between clients
    p = sim.personal
    assert components(p[0]) == {"B.dir", "B.mag"}
    for k in p[0]:
        assert not torch.equal(p[0][k], p[1][k]), k


def test_unit_direction_scale_gives_unit_rows(tok, base):
    sim = make_sim(tok, base, "fedlora_opt", "rounds=1", "direction_scale=unit", "b_direction=unit")
    sim.run()
    for k, v in select(sim.server.global_state, {"A.dir", "B.dir"}).items():
        assert torch.allclose(vector_norms(v, "rows"), torch.ones(v.shape[0]), atol=1e-5)


def test_fedlora_opt_is_zero_delta_at_init_and_roundtrips(tok, base):
    x = torch.tensor([[5, 6, 7, 8, 9]])
    ref = base(x).logits
    sim = make_sim(tok, base, "fedlora_opt")
    assert torch.equal(sim.am.model(x).logits, ref)  # B.mag = 0 -> delta W = 0
    st = sim.am.state()
    sim.am.load_state({k: torch.randn_like(v) for k, v in st.items()})
    sim.am.load_state(st)
    assert all(torch.equal(v, sim.am.state()[k]) for k, v in st.items())


@pytest.mark.parametrize("method", ["fedlora_opt", "fedit", "feddora", "feddpa"])
def test_exported_peft_adapter_reproduces_logits(tok, base, method, tmp_path):
    sim = make_sim(tok, base, method, "rounds=1")
    sim.run()
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    state = sim.local_state(1) if sim.method.personal else sim.server.global_state
    sim.am.load_state(state)
    ours = sim.am.model(x).logits
    sim.am.export_peft(state, tmp_path / "adapter")
    clean = sim.am.release()
    peft_model = PeftModel.from_pretrained(clean, tmp_path / "adapter")
    peft_model.eval()
    assert torch.allclose(peft_model(x).logits, ours, atol=1e-5)


def test_fedprox_with_mu_zero_equals_fedit(tok):
    from tiny import tiny_model

    results = []
    for method, extra in (("fedit", []), ("fedprox", ["prox_mu=0.0"])):
        sim = make_sim(tok, tiny_model(len(tok)), method, *extra)
        sim.run()
        results.append(sim.server.global_state)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_fedprox_pulls_towards_global(tok):
    from tiny import tiny_model

    drift = {}
    for mu in (0.0, 100.0):
        sim = make_sim(tok, tiny_model(len(tok)), "fedprox", f"prox_mu={mu}", "rounds=1", "lr=0.01")
        start = sim.server.shared_state()
        res = sim.client.global_phase(0, 1, start, None, sim.train_rows[0])
        drift[mu] = sum(float((res.update.state[k] - start[k]).norm()) for k in start)
    assert drift[100.0] < drift[0.0]


def test_swapping_adapters_leaks_nothing_between_clients(tok, base):
    sim = make_sim(tok, base, "fedsa", "rounds=1")
    sim.run()
    x = torch.tensor([[5, 6, 7, 8]])
    sim.am.load_state(sim.local_state(0))
    out0 = sim.am.model(x).logits.clone()
    sim.am.load_state(sim.local_state(1))
    out1 = sim.am.model(x).logits.clone()
    sim.am.load_state(sim.local_state(0))
    assert torch.equal(sim.am.model(x).logits, out0)
    assert not torch.equal(out0, out1)


def test_same_seed_same_numbers(tok):
    from tiny import tiny_model

    runs = []
    for _ in range(2):
        sim = make_sim(tok, tiny_model(len(tok)), "fedlora_opt", "federation.fraction=0.67")
        hist = sim.run()
        runs.append(([h.as_dict() | {"wall_time": 0, "eval": None} for h in hist],
                     [h.eval["global"]["loss"] for h in hist], sim.server.global_state))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in runs[0][2])


def test_local_only_and_centralized_run(tok, base):
    sim = make_sim(tok, base, "local_only", "rounds=1")
    ups = record_uploads(sim)
    sim.run()
    assert not ups  # nothing aggregated
    rec = sim.history[-1]
    assert rec.bytes_up == 0
    clean = sim.am.release()
    sim = make_sim(tok, clean, "centralized", "rounds=1")
    sim.run()
    # K clients x (E_g + E_l) steps x batch: equal compute, one phase trains both budgets
    assert sim.history[-1].sampled == [0] and sim.history[-1].examples == 3 * (2 + 2) * 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_transfer_halves_the_bytes_and_keeps_the_server_in_float32(tok, dtype):
    from tiny import tiny_model

    runs = {}
    for name in ("float32", dtype):
        sim = make_sim(tok, tiny_model(len(tok)), "fedlora_opt", f"transfer_dtype={name}")
        ups = record_uploads(sim)
        hist = sim.run()
        runs[name] = (sim, ups, hist)
    sim16, ups16, hist16 = runs[dtype]
    _, ups32, hist32 = runs["float32"]
    want = getattr(torch, dtype)
    assert all(v.dtype == want for u in ups16 for v in u.state.values())
    assert all(v.dtype == want for v in sim16.server.shared_state().values())
    assert all(v.dtype == torch.float32 for v in sim16.server.global_state.values())
    assert not any(h.rejected for h in hist16)
    for h16, h32 in zip(hist16, hist32):
        assert h16.bytes_up * 2 == h32.bytes_up and h16.bytes_down * 2 == h32.bytes_down
    # rounding the transferred tensors changes the model only slightly
    assert hist16[-1].eval["global"]["loss"] == pytest.approx(hist32[-1].eval["global"]["loss"], rel=2e-2)


def test_length_buckets_option_trains_the_same_rows(tok):
    from tiny import tiny_model

    out = {}
    for flag in ("false", "true"):
        sim = make_sim(tok, tiny_model(len(tok)), "fedit", f"train.length_buckets={flag}", "rounds=1")
        res = sim.client.global_phase(0, 1, sim.server.shared_state(), None, sim.train_rows[0])
        out[flag] = res.stats
    assert out["true"].examples == out["false"].examples and out["true"].steps == out["false"].steps


def test_local_lr_mult_scales_only_the_local_phase():
    from fedlora.config import MethodConfig
    from fedlora.core.methods import METHODS

    one = METHODS["fedlora_opt"](MethodConfig(local_lr_mult=1.0, pipeline="sequential"))
    ten = METHODS["fedlora_opt"](MethodConfig(local_lr_mult=10.0, pipeline="sequential"))
    assert ten.global_train == one.global_train
    assert set(ten.local_train) == set(one.local_train) == {"B.mag"}
    assert ten.local_train["B.mag"] == pytest.approx(10.0 * one.local_train["B.mag"])


@pytest.mark.parametrize("method", ["fedit", "fedsa", "fedlora_opt", "feddpa"])
def test_every_method_spends_the_same_steps_per_client_round(tok, method):
    """Equal compute: one-phase methods train E_g + E_l steps; two-phase methods E_g then E_l (train.equal_steps)."""
    from tiny import tiny_model

    sim = make_sim(tok, tiny_model(len(tok)), method, "rounds=1", "global_steps=3", "personal_steps=2")
    assert sim.run()[-1].steps == 5
    if not sim.method.has_local_phase:
        sim = make_sim(tok, tiny_model(len(tok)), method, "rounds=1", "global_steps=3", "personal_steps=2",
                       "train.equal_steps=false")
        assert sim.run()[-1].steps == 3


def test_joint_split_equals_two_adam_optimizers():
    """split_joint's claim: training g + o as one tensor with lr_g + lr_o, then splitting the change in the ratio
    of the learning rates, is exactly two Adam optimizers (lr_g on g, lr_o on o) fed the same gradients."""
    from fedlora.core.protocol import split_joint

    torch.manual_seed(0)
    target, g0, o0 = torch.randn(6), torch.randn(6), torch.randn(6)
    lr_g, lr_o = 0.01, 0.07
    loss = lambda x: ((x - target) ** 2 * torch.arange(1.0, 7.0)).sum()  # noqa: E731
    g, o = g0.clone().requires_grad_(), o0.clone().requires_grad_()
    opts = [torch.optim.Adam([g], lr=lr_g), torch.optim.Adam([o], lr=lr_o)]
    both = (g0 + o0).requires_grad_()
    one = torch.optim.Adam([both], lr=lr_g + lr_o)
    for _ in range(7):
        for opt in opts:
            opt.zero_grad()
        loss(g + o).backward()
        for opt in opts:
            opt.step()
        one.zero_grad()
        loss(both).backward()
        one.step()
    key = "model.layers.0.self_attn.q_proj.lora_B.default.parametrizations.weight.original1"  # a B.mag parameter
    trained, offsets = split_joint({key: both.detach()}, {key: g0}, {key: o0},
                                   {"B.mag": lr_g / (lr_g + lr_o)})
    assert torch.allclose(trained[key], g.detach(), atol=1e-6)
    assert torch.allclose(offsets[key], o.detach(), atol=1e-6)
    assert not torch.allclose(g.detach(), g0)  # it trained


@pytest.mark.parametrize("b_direction", ["unit", "free"])
def test_joint_pipeline_trains_global_and_personal_b_mag_in_the_same_steps(tok, base, b_direction):
    """pipeline=joint: one phase of E_g + E_l steps; the upload carries B.mag's global part, the offset stays home;
    the server's B.mag moved by s/(1 - s) times the clients' mean offset (s = the global share of the lr). The same
    with a free B (B.mag a gain of B's rows)."""
    sim = make_sim(tok, base, "fedlora_opt", "rounds=1", "pipeline=joint", "global_steps=3", "personal_steps=2",
                   "local_lr_mult=3", f"b_direction={b_direction}")
    ups = record_uploads(sim)
    g0 = {k: v.clone() for k, v in select(sim.server.global_state, {"B.mag"}).items()}
    rec = sim.run()[-1]
    assert rec.steps == 5 and rec.local_phase_loss is None  # all steps in one phase
    assert ups and all(components(u.state) == {"A.dir", "A.mag", "B.dir", "B.mag"} for u in ups)
    _, share = sim.client.joint_multipliers()
    s = share["B.mag"]
    assert s == pytest.approx(1 / 4)  # lr_o = 3 x lr_g (local_lr_mult, personal_lr unset)
    g = sim.server.global_state
    p = sim.personal
    assert {component_of(k) for k in p[0]} == {"B.mag"}
    key = next(iter(g0))
    assert torch.count_nonzero(p[0][key]) and not torch.equal(p[0][key], p[1][key])
    mean_offset = sum(p[c][key] for c in p) / len(p)
    assert torch.allclose(g[key] - g0[key], s / (1 - s) * mean_offset, atol=1e-6)
    local = sim.local_state(0)
    assert torch.allclose(local[key], g[key] + p[0][key])
    if b_direction == "free":  # the gains started at 1 and B.dir moved as a plain (unnormalized) LoRA B
        assert torch.allclose(g0[key], torch.ones_like(g0[key])) and not torch.equal(g[key], g0[key])
        assert sim.am.axes.keys() == {"A.dir"}


def test_joint_pipeline_needs_an_offset():
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="joint schedule .* personal_mode 'offset'"):
        small_cfg("method=fedlora_opt", "pipeline=joint", "personal_mode=reset")
    with pytest.raises(ConfigError, match="share_b_mag"):
        small_cfg("method=fedlora_opt", "pipeline=joint", "share_b_mag=false")



def test_generation_only_where_generate_every_says(tok, base):
    """eval.generate_every=2: every round's evaluation scores the loss; rounds 2 and 3 (every 2nd and the last)
    also generate (ROUGE-L). With 0, only the last does."""
    history = make_sim(tok, base, "fedit", "rounds=3", "eval.every=1", "eval.generate_every=2").run()
    assert all(h.eval["global"]["loss"] > 0 and h.eval["local"]["loss"] > 0 for h in history)
    assert [h.eval["global"]["rouge_l"] is not None for h in history] == [False, True, True]
    assert [h.eval["local"]["rouge_l"] is not None for h in history] == [False, True, True]
    last_only = small_cfg("eval.generate_every=0").eval
    assert [last_only.at_round(r, 3).generate for r in (1, 2, 3)] == [False, False, True]

