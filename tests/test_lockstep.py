"""Clients in lockstep (fedlora.lockstep) give what training them one after another gives, up to float rounding."""

import math

import pytest
import torch
from conftest import small_cfg
from tiny import tiny_model

from fedlora.data.federated import build_federated_data, load_examples
from fedlora.lockstep import reason_unsupported, train_lockstep
from fedlora.simulation import Simulation
from fedlora.training import phase_rng, sample_batches, train_phase


def make_sim(tok, method, *overrides):
    cfg = small_cfg(f"method={method}", "lora.dropout=0.0", "max_grad_norm=0.05", *overrides)
    examples, unseen = load_examples(cfg, warn=lambda m: None)
    logs = []
    sim = Simulation(cfg, tok, tiny_model(len(tok)), build_federated_data(cfg, examples, unseen), log=logs.append)
    return sim, logs


def max_diff(a, b):
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize(
    "method,options",
    [("fedit", ()), ("fedlora_opt", ()), ("fedlora_opt", ("method_options.pipeline=sequential",)),
     ("fedlora_opt", ("share_b_dir=false", "method_options.personal_mode=persist", "method_options.pipeline=sequential")),
     ("fedsa", ())],
)
def test_lockstep_rounds_equal_sequential_rounds(tok, method, options):
    runs = {}
    for lockstep in ("false", "true"):
        sim, logs = make_sim(tok, method, f"federation.lockstep={lockstep}", "generate=false", *options)
        hist = sim.run()
        runs[lockstep] = (sim, hist, logs)
    (seq, seq_hist, _), (lock, lock_hist, lock_logs) = runs["false"], runs["true"]
    assert not lock_logs, lock_logs  # it really ran in lockstep (no fallback)
    assert max_diff(seq.server.global_state, lock.server.global_state) < 1e-5
    assert set(seq.personal) == set(lock.personal)
    for cid in seq.personal:
        if seq.personal[cid]:
            assert max_diff(seq.personal[cid], lock.personal[cid]) < 1e-5
    for a, b in zip(seq_hist, lock_hist):
        assert a.examples == b.examples and a.sampled == b.sampled
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        if a.local_phase_loss is not None:
            assert a.local_phase_loss == pytest.approx(b.local_phase_loss, rel=1e-5)
    assert seq_hist[-1].eval["global"]["loss"] == pytest.approx(lock_hist[-1].eval["global"]["loss"], rel=1e-5)
    # the clipping was active (max_grad_norm 0.05), so per-client clipping is what was compared
    assert any(not torch.equal(seq.server.global_state[k], seq.am.init_state[k]) for k in seq.server.global_state)


def test_unsupported_methods_fall_back_with_one_line(tok):
    sim, logs = make_sim(tok, "fedprox", "federation.lockstep=true", "rounds=1", "generate=false")
    ref, _ = make_sim(tok, "fedprox", "rounds=1", "generate=false")
    sim.run()
    ref.run()
    assert logs == ["federation.lockstep: training one client after another (the method adds loss terms "
                    "(e.g. FedProx))"]
    assert max_diff(sim.server.global_state, ref.server.global_state) == 0.0


def test_a_diverging_client_stops_alone(tok):
    sim, _ = make_sim(tok, "fedit", "rounds=1")
    am, t = sim.am, sim.cfg.train
    trainable = sim.method.global_train
    starts = [dict(am.init_state) for _ in range(3)]
    poisoned = next(k for k in starts[1] if sim.am.components[k] == "A")
    starts[1] = {**starts[1], poisoned: torch.full_like(starts[1][poisoned], float("nan"))}
    batches = [sample_batches(sim.train_rows[c], 3, t.batch_size, 1, phase_rng(0, c)) for c in range(3)]
    assert reason_unsupported(am, batches, False) is None
    states, stats = train_lockstep(am, starts, batches, trainable, lr=t.lr, train_cfg=t, pad_id=sim.client.pad_id)
    assert stats[1].diverged and stats[1].steps == 0 and math.isnan(stats[1].loss)
    assert torch.isnan(states[1][poisoned]).all()  # left as it was before the failing step
    for c in (0, 2):
        am.load_state(starts[c])
        alone = train_phase(am, batches[c], trainable, lr=t.lr, train_cfg=t, pad_id=sim.client.pad_id)
        assert not stats[c].diverged and stats[c].steps == alone.steps == 3
        assert stats[c].loss == pytest.approx(alone.loss, rel=1e-5)
        assert max_diff(states[c], am.state()) < 1e-5


def test_reasons_for_sequential_training(tok):
    sim, _ = make_sim(tok, "feddora", "rounds=1")
    rows = sim.train_rows[0]
    b = sample_batches(rows, 2, 2, 1, phase_rng(0))
    assert "adapter kind 'dora'" in reason_unsupported(sim.am, [b, b], False)
    sim, _ = make_sim(tok, "fedit", "rounds=1")
    assert reason_unsupported(sim.am, [b], False) == "fewer than two clients"
    assert "differ in steps" in reason_unsupported(sim.am, [b, sample_batches(rows, 3, 2, 1, phase_rng(0))], False)
