"""Each adapter kind (fedlora.adapter_kinds) on the tiny model: state round trip, components, export, batching."""

import re
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from tiny import tiny_model

from fedlora.adapter_kinds import KINDS, kind_class
from fedlora.adapters import AdapterModel
from fedlora.config import LoraConfig, MethodConfig
from fedlora.core.components import NAMINGS, component_of
from fedlora.core.methods import ADAPTER_COMPONENTS, build_method
from fedlora.lockstep import reason_unsupported

LORA = LoraConfig(r=4, alpha=8, dropout=0.0)
MAGDIR_OPTIONS = {"norm_axis_a": "cols", "norm_axis_b": "rows", "b_mag_init": 0.3, "b_dir_init_norm": 0.5}
X = torch.tensor([[5, 6, 7, 8, 9, 10]])


FREE_B = "magdir:free"
"""The magnitude/direction kind with a free B (b_direction="free"), tested as a kind of its own."""


def build(tok, kind, seed=0):
    if kind == FREE_B:
        return AdapterModel(tiny_model(len(tok)), "magdir", LORA, seed=seed, **MAGDIR_OPTIONS, b_direction="free")
    return AdapterModel(tiny_model(len(tok)), kind, LORA, seed=seed, **MAGDIR_OPTIONS)


def perturbed(state, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.mark.parametrize("kind", [*KINDS, FREE_B])
def test_state_round_trips_and_release_gives_the_clean_base(tok, kind):
    am = build(tok, kind)
    assert am.kind == kind.split(":")[0] and type(am.impl) is KINDS[am.kind]
    assert list(am.init_state) == list(am.params)
    state = perturbed(am.init_state)
    am.load_state(state)
    assert all(torch.equal(v, state[k]) for k, v in am.state().items())
    am.load_state(am.init_state)
    assert all(torch.equal(v, am.init_state[k]) for k, v in am.state().items())
    again = build(tok, kind)  # the same seed gives the same init
    assert all(torch.equal(v, am.init_state[k]) for k, v in again.init_state.items())
    clean = am.release()
    assert not any(".lora_" in n for n, _ in clean.named_parameters())
    assert torch.equal(clean(X).logits, tiny_model(len(tok))(X).logits)


@pytest.mark.parametrize("kind", list(KINDS))
def test_components_cover_every_adapter_parameter_exactly_once(tok, kind):
    am = build(tok, kind)
    naming = NAMINGS[kind]
    lora_params = [n for n, _ in am.model.named_parameters() if ".lora_" in n]
    assert lora_params == list(am.params)
    for n in lora_params:
        matches = [c for c, p in naming.patterns.items() if re.search(p, n)]
        assert matches == [am.components[n]] == [component_of(n)], n
    assert set(am.components.values()) == set(ADAPTER_COMPONENTS[kind]) == set(am.impl.components)
    assert am.set_trainable(["A"] if "A" in naming.components else ["A.dir"]).keys() <= set(naming.components)


@pytest.mark.parametrize("kind", [*KINDS, FREE_B])
def test_export_loads_with_plain_peft_and_gives_the_same_logits(tok, kind, tmp_path):
    am = build(tok, kind)
    state = perturbed(am.init_state)
    am.load_state(state)
    with torch.no_grad():
        ours = am.model(X).logits
    am.load_state(am.init_state)
    am.export_peft(state, tmp_path / "adapter")
    assert all(torch.equal(v, am.init_state[k]) for k, v in am.state().items())  # export leaves the model as it was
    peft_model = PeftModel.from_pretrained(tiny_model(len(tok)), tmp_path / "adapter")
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(X).logits
    assert not torch.allclose(ours, tiny_model(len(tok))(X).logits, atol=1e-4)  # the adapter does something
    assert torch.allclose(theirs, ours, atol=1e-5)


@pytest.mark.parametrize("kind", [k for k, cls in KINDS.items() if cls.lockstep] + ["dual", FREE_B])
def test_factors_of_stacked_states_are_the_stacked_factors(tok, kind):
    am = build(tok, kind)
    states = [perturbed(am.init_state, seed) for seed in (1, 2, 3)]
    stacked = {k: torch.stack([s[k] for s in states]) for k in am.params}
    for name, _ in am.lora_layers():
        a, b = am.impl.factors(stacked, name)
        for i, s in enumerate(states):
            a_i, b_i = am.impl.factors(s, name)
            assert torch.allclose(a[i], a_i, atol=1e-6) and torch.allclose(b[i], b_i, atol=1e-6)


def test_dora_has_no_plain_factors_and_no_lockstep(tok):
    am = build(tok, "dora")
    name = next(n for n, _ in am.lora_layers())
    with pytest.raises(NotImplementedError, match="'dora'"):
        am.impl.factors(am.init_state, name)
    assert reason_unsupported(am, [[], []], False) == "adapter kind 'dora' (lockstep supports lora and magdir)"


def test_unknown_kind_is_rejected_with_one_clear_line(tok):
    with pytest.raises(ValueError) as err:
        AdapterModel(tiny_model(len(tok)), "lorra", LORA)
    msg = str(err.value)
    assert msg == "unknown adapter kind 'lorra'; known: lora, magdir, dora, dual"
    with pytest.raises(ValueError, match="^unknown adapter kind 'x'; known: "):
        kind_class("x")


def test_for_method_builds_what_the_constructor_builds(tok):
    mo = MethodConfig(norm_axis_a="cols", b_mag_init=0.3, b_dir_init_norm=0.5, b_direction="unit")
    cfg = SimpleNamespace(lora=LORA, method_options=mo, seed=5, model=SimpleNamespace(name=""))
    method = build_method("fedlora_opt", mo, rank=LORA.r)
    am = AdapterModel.for_method(tiny_model(len(tok)), method, cfg)
    ref = AdapterModel(tiny_model(len(tok)), "magdir", LORA, norm_axis_a="cols", b_mag_init=0.3,
                       b_dir_init_norm=0.5, seed=5)
    assert am.kind == "magdir" and am.axes == {"A.dir": "cols", "B.dir": "rows"}
    assert all(torch.equal(v, ref.init_state[k]) for k, v in am.init_state.items())
    assert set(am.components.values()) == set(method.components)


def test_a_free_b_starts_as_plain_lora_and_is_no_direction(tok):
    """b_direction="free": B = diag(B.mag)·B.dir with B.dir PEFT's zero B and gains of 1, so the adapter starts at
    ΔW = 0 like plain LoRA, and aggregation treats B.dir as a plain tensor (only A.dir has a norm axis)."""
    am = build(tok, FREE_B)
    assert am.axes == {"A.dir": "cols"}
    unit_b = build(tok, "magdir")
    for k, v in am.init_state.items():
        if am.components[k] == "B.dir":
            assert torch.count_nonzero(v) == 0
        elif am.components[k] == "B.mag":
            assert torch.equal(v, torch.ones_like(v))
        else:  # A is the same as the unit form's
            assert torch.equal(v, unit_b.init_state[k])
    with torch.no_grad():
        assert torch.equal(am.model(X).logits, tiny_model(len(tok))(X).logits)
    state = perturbed(am.init_state)
    name = next(n for n, _ in am.lora_layers())
    b_dir = next(v for k, v in state.items() if k.startswith(name + ".") and am.components[k] == "B.dir")
    b_mag = next(v for k, v in state.items() if k.startswith(name + ".") and am.components[k] == "B.mag")
    assert torch.allclose(am.impl.factors(state, name)[1], b_mag.unsqueeze(-1) * b_dir)  # not normalized
    with pytest.raises(ValueError, match="^b_direction must be 'unit' or 'free', got 'loose'$"):
        AdapterModel(tiny_model(len(tok)), "magdir", LORA, b_direction="loose")
