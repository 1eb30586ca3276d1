"""Client-level differential privacy (core/dp.py): noise scale, clipping, the accountant's ε, DP off unchanged,
ε per round in metrics.jsonl / results.md / results.json, one-line config errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import DOLLY
from runkit import metrics_without_wall_time

from fedlora.cli import main
from fedlora.config import MethodConfig, load_config
from fedlora.core import dp
from fedlora.core.aggregate import ClientUpdate, direction_aware_mean
from fedlora.core.magdir import vector_norms
from fedlora.core.methods import build_method
from fedlora.core.server import Server
from fedlora.core.server_opt import FedAvg
from fedlora.errors import ConfigError

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
KEY_AD = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.parametrizations.weight.original0"
KEY_AM = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.parametrizations.weight.original1"


def _opts(mode="central", z=2.0, c=1.0, n=8, k=4, **kw) -> dp.DPOptions:
    return dp.DPOptions(mode, z, c, kw.pop("delta", 1e-5), kw.pop("accounting", "poisson"), n, k, kw.pop("seed", 0))


def _big_update(scale: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = {KEY_A: torch.randn(100, 100, generator=g), KEY_B: torch.randn(100, 100, generator=g)}
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in d.values()))
    return {k: v * (scale / norm) for k, v in d.items()}


# ----------------------------------------------------------------------------- 1. noise scale and clipping


def test_central_noise_has_std_z_c_over_k_and_clipping_bounds_each_delta():
    init = {KEY_A: torch.zeros(100, 100), KEY_B: torch.zeros(100, 100)}
    delta = _big_update(3.0)  # norm 3 > C = 1: clipped to delta / 3
    ups = [ClientUpdate(i, {k: v.clone() for k, v in delta.items()}, 10 * (i + 1)) for i in range(4)]
    server = Server(build_method("fedit", MethodConfig()), init, FedAvg(), {}, privacy=_opts(z=2.0, c=1.0, k=4))
    report = server.aggregate(ups)
    noise = torch.cat([(server.global_state[k] - delta[k] / 3).flatten() for k in init])
    assert abs(float(noise.std()) - 2.0 * 1.0 / 4) < 0.015 and abs(float(noise.mean())) < 0.01  # sigma = z*C/k
    p = report.privacy
    assert (p["noise_std"], p["clipped"], p["releases"], p["aggregated"]) == (0.5, 4, 1, 4) and p["epsilon"] > 0
    assert report.clipped == [0, 1, 2, 3]

    # almost no noise: the aggregate is the clipped delta (norm exactly C), and the denominator stays k = 4
    quiet = Server(build_method("fedit", MethodConfig()), init, FedAvg(), {}, privacy=_opts(z=1e-9, c=1.0, k=4))
    quiet.aggregate(ups[:2])  # two of the four planned clients arrive: (clip + clip) / 4
    assert torch.allclose(quiet.global_state[KEY_A], delta[KEY_A] / 3 / 2, atol=1e-7)
    small = _big_update(0.5, seed=1)  # norm 0.5 <= C: not clipped
    cs, was = dp.clipped([delta, small], 1.0)
    assert was == [True, False] and torch.equal(cs[1][KEY_A], small[KEY_A])
    assert abs(math.sqrt(sum(float(v.pow(2).sum()) for v in cs[0].values())) - 1.0) < 1e-5


def test_local_noise_has_std_z_c_and_directions_keep_the_reference_scale():
    ref = {KEY_A: torch.zeros(100, 100), KEY_B: torch.zeros(100, 100)}
    delta = _big_update(4.0)
    upload = {k: ref[k] + v for k, v in delta.items()}
    opts = _opts("local", z=1.5, c=2.0)
    noisy, was = dp.privatize_upload(upload, ref, {}, opts, dp.noise_generator(0, 1, 3, 0xD1))
    noise = torch.cat([(noisy[k] - delta[k] / 2).flatten() for k in ref])  # clipped to C = 2: delta / 2
    assert was and abs(float(noise.std()) - 1.5 * 2.0) < 0.08 and abs(float(noise.mean())) < 0.05
    again, _ = dp.privatize_upload(upload, ref, {}, opts, dp.noise_generator(0, 1, 3, 0xD1))
    other, _ = dp.privatize_upload(upload, ref, {}, opts, dp.noise_generator(0, 1, 4, 0xD1))
    assert torch.equal(again[KEY_A], noisy[KEY_A]) and not torch.equal(other[KEY_A], noisy[KEY_A])

    # a direction tensor: noise on unit rows, re-normalized, stored with the reference's row norms
    d0 = 0.01 * torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    ref = {KEY_AD: d0, KEY_AM: torch.ones(4)}
    up = {KEY_AD: 5.0 * (d0 + 0.003 * torch.randn(4, 6)), KEY_AM: torch.ones(4) + 0.1}
    out, _ = dp.privatize_upload(up, ref, {"A.dir": "rows"}, _opts("local", z=0.1, c=1.0),
                                 dp.noise_generator(0, 1, 0, 0xD1))
    assert torch.allclose(vector_norms(out[KEY_AD], "rows"), torch.full((4,), 0.01), rtol=1e-5)


def test_the_ledger_survives_a_restart_and_the_noise_continues_the_same():
    init = {KEY_A: torch.zeros(20, 20), KEY_B: torch.zeros(20, 20)}
    ups = [ClientUpdate(i, _big_update(0.5, seed=i), 1) for i in range(2)]
    ups = [ClientUpdate(u.client_id, {k: v[:20, :20] for k, v in u.state.items()}, 1) for u in ups]
    fedit = build_method("fedit", MethodConfig())
    one = Server(fedit, init, FedAvg(), {}, privacy=_opts(k=2))
    one.aggregate(ups)
    two = Server(fedit, init, FedAvg(), {}, privacy=_opts(k=2))
    two.load_state_dict(one.state_dict())
    r1, r2 = one.aggregate(ups), two.aggregate(ups)
    assert r1.privacy == r2.privacy and r1.privacy["releases"] == 2
    assert torch.equal(one.global_state[KEY_A], two.global_state[KEY_A])


# ----------------------------------------------------------------------------- 2. the accountant


def _rdp_epsilon(z: float, rounds: int, delta: float, orders) -> float:
    """Closed form, q = 1: RDP(α) = T·α/(2z²) (Mironov 2017), to (ε, δ) by Canonne et al. 2020 Prop. 12."""
    a = np.asarray(orders, dtype=np.float64)
    a = a[a > 1.01]
    rdp = rounds * a / (2 * z * z)
    return float(np.min(rdp + np.log1p(-1 / a) - np.log(delta * a) / (a - 1)))


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact ε of a Gaussian mechanism with sensitivity/σ = mu (Balle & Wang 2018), by bisection."""
    from scipy.stats import norm

    def d(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z,rounds,delta", [(1.0, 10, 1e-5), (2.0, 50, 1e-6), (0.8, 3, 1e-5)])
def test_epsilon_without_sampling_is_the_closed_form_gaussian_rdp(z, rounds, delta):
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

    for opts in (_opts(z=z, n=8, k=8, delta=delta), _opts(z=z, n=8, k=3, delta=delta, accounting="none"),
                 _opts("local", z=z, n=8, k=3, delta=delta)):
        eps = dp.epsilon(opts, rounds)
        assert eps == pytest.approx(_rdp_epsilon(z, rounds, delta, DEFAULT_RDP_ORDERS), rel=1e-9)
        # an upper bound of the exact value: T Gaussians of noise z are one Gaussian of noise z / sqrt(T)
        exact = _exact_gaussian_epsilon(math.sqrt(rounds) / z, delta)
        assert exact < eps < 1.5 * exact
    # z = 1, 10 rounds, delta 1e-5, q = 1: about 19.05 (dp-accounting 0.6.0)
    assert dp.epsilon(_opts(z=1.0, n=8, k=8), 10) == pytest.approx(19.0536, abs=1e-3)


def test_sampling_amplifies_and_epsilon_grows_with_rounds():
    poisson = [dp.epsilon(_opts(z=1.0, n=10, k=3), t) for t in (1, 2, 5)]
    assert poisson[0] < poisson[1] < poisson[2] < dp.epsilon(_opts(z=1.0, n=10, k=10), 5)
    assert dp.epsilon(_opts(z=1.0, n=10, k=3, accounting="fixed_size"), 5) > poisson[2]  # replace-one, 2C
    acc = dp.Accountant(_opts(z=1.0, n=10, k=3))
    acc.advance(2)
    acc.advance(5)  # composed incrementally = composed at once
    assert acc.epsilon() == pytest.approx(poisson[2], rel=1e-12) and dp.epsilon(_opts(), 0) == 0.0


# ----------------------------------------------------------------------------- 3./4. runs


def _run(tmp_path, tiny_dir, name, *sets):
    out = tmp_path / name
    base = [f"model.name={tiny_dir}", f"data.path={DOLLY}", "max_rows=120", "clients=4", "fraction=0.5", "rounds=3",
            "global_steps=1", "personal_steps=1", "train.batch_size=2", "max_length=48", "max_examples_per_client=2",
            "max_global_examples=2", "max_gen_examples=0", "global_test_per_label=1", "output.plots=false",
            "model.threads=1", "eval.every=0", "lora.dropout=0.0"]
    threads = torch.get_num_threads()
    try:
        assert main(["run", "--out", str(out), *[x for s in (*base, *sets) for x in ("--set", s)]]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_dp_off_changes_nothing(tmp_path, tiny_dir):
    plain = _run(tmp_path, tiny_dir, "plain")
    off = _run(tmp_path, tiny_dir, "off", "privacy.mode=off", "privacy.noise_multiplier=7",
               "privacy.clipping_norm=0.0001", "privacy.accounting=none")
    a, b = torch.load(plain / "global_state.pt"), torch.load(off / "global_state.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = metrics_without_wall_time(plain / "metrics.jsonl")
    assert rows == metrics_without_wall_time(off / "metrics.jsonl") and all("privacy" not in r for r in rows)
    assert "privacy" not in json.loads((off / "results.json").read_text())
    assert "Differential privacy" not in (off / "results.md").read_text()
    # the server's off path is the example-weighted mean it always was
    ups = [ClientUpdate(i, _big_update(1.0 + i, seed=i), 3 + i) for i in range(3)]
    init = {KEY_A: torch.zeros(100, 100), KEY_B: torch.zeros(100, 100)}
    server = Server(build_method("fedit", MethodConfig()), init, FedAvg(), {})
    assert server.aggregate(ups).privacy is None
    want = direction_aware_mean([u.state for u in ups], [3, 4, 5], {})
    assert all(torch.equal(server.global_state[k], want[k]) for k in init)


@pytest.mark.parametrize("mode", ["central", "local"])
def test_a_dp_run_reports_epsilon_per_round(tmp_path, tiny_dir, monkeypatch, mode):
    calls = []
    real = dp.privatize_upload
    monkeypatch.setattr(dp, "privatize_upload", lambda *a: calls.append(a[3].mode) or real(*a))
    out = _run(tmp_path, tiny_dir, mode, f"privacy.mode={mode}", "privacy.clipping_norm=0.5",
               "privacy.noise_multiplier=1.0")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    eps = [r["privacy"]["epsilon"] for r in rows]
    assert len(eps) == 3 and all(0 < e for e in eps) and eps == sorted(eps)
    assert calls == (["local"] * 6 if mode == "local" else [])  # 2 sampled clients x 3 rounds, noised on the client
    if mode == "central":
        assert eps[0] < eps[1] < eps[2]
        assert eps == pytest.approx([dp.epsilon(_opts(z=1.0, c=0.5, n=4, k=2), t) for t in (1, 2, 3)], rel=1e-9)
        assert rows[0]["privacy"]["noise_std"] == pytest.approx(1.0 * 0.5 / 2)
    summary = json.loads((out / "results.json").read_text())["privacy"]
    assert summary["epsilon"] == eps[-1] and summary["delta"] == 1e-5 and summary["mode"] == mode
    assert f"ε = {eps[-1]:.3f} at δ = 1e-05" in (out / "results.md").read_text()


# ----------------------------------------------------------------------------- 5. config


@pytest.mark.parametrize("sets,needle", [
    (["privacy.mode=central"], "privacy.clipping_norm: must be set when privacy.mode is 'central'"),
    (["privacy.mode=local", "privacy.clipping_norm=1", "privacy.noise_multiplier=0"],
     "privacy.noise_multiplier: 0.0 must be > 0"),
    (["privacy.mode=central", "privacy.clipping_norm=1", "privacy.delta=0.5"],
     "privacy.delta: 0.5 must be below 1/federation.clients"),
    (["privacy.mode=central", "privacy.clipping_norm=1", "aggregation=median"],
     "federation.aggregation: 'median' cannot be used with privacy.mode 'central'"),
    (["privacy.mode=central", "privacy.clipping_norm=1", "method=centralized"],
     "privacy.mode: method 'centralized' uploads no client updates"),
    (["privacy.mode=on"], "privacy.mode"),
])
def test_bad_privacy_config_is_one_line(sets, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["clients=10", *sets])
    assert str(e.value).startswith(needle) and "\n" not in str(e.value)
    assert load_config(None, ["privacy.mode=local", "clipping_norm=0.3"]).privacy.clipping_norm == 0.3
