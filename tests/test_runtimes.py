"""One global model in every runtime: `fedlora run` (in process) and the Flower ServerApp + ClientApp give the
same rounds, the same base-model row, the same global and local losses and the same `adapters/global/` tensors,
for every federated method; and no Flower reply carries a personal component.

The Flower side runs the real ServerApp code (`run_flower`) and the real ClientApp over `LoopbackGrid` (Flower's
wire format, one Context per node, no network). `fedlora flower simulate` (Ray) and a real SuperLink/SuperNode
deployment are compared with the in-process run in test_flower.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DOLLY
from loopback_grid import LoopbackGrid
from rich.console import Console
from safetensors.torch import load_file

from fedlora.config import load_config
from fedlora.core.components import component_of
from fedlora.core.methods import METHODS, build_method
from fedlora.flower import messages as M

FEDERATED = [m for m in METHODS if m != "centralized"]  # centralized pools the data: no Flower deployment
NODES = 3


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("runtimes") / "dolly_small.jsonl"
    with open(DOLLY) as f:
        path.write_text("".join(line for i, line in enumerate(f) if i % 150 == 0))
    return path


def config(method: str, model_dir, data, out, *extra):
    return load_config(None, [
        f"method={method}", "seed=0", f"model.name={model_dir}", "model.device=cpu", "model.threads=1",
        f"data.path={data}", "partition=dirichlet", "data.alpha=1.0", "max_length=48", "global_test_per_label=2",
        f"clients={NODES}", "rounds=2", "global_steps=2", "personal_steps=2", "train.batch_size=2", "train.lr=0.01",
        "max_examples_per_client=3", "max_global_examples=8", "max_gen_examples=1", "max_new_tokens=3",
        "lora.dropout=0.0", f"output.dir={out}", "output.plots=false", *extra,
    ])


def run_in_process(cfg, out):
    from fedlora.runner import Session, run_experiment

    out.mkdir(parents=True)
    return run_experiment(Session(cfg, Console(quiet=True)), cfg, out, show_partition=False)


def run_on_flower(cfg, out):
    from fedlora.flower import client_app
    from fedlora.flower.server_app import run_flower
    from fedlora.flower.settings import RunSettings

    out.mkdir(parents=True)
    nodes = {100 + i: {"partition-id": i, "num-partitions": NODES, "state-dir": str(out / "node-state")}
             for i in range(NODES)}
    with LoopbackGrid(client_app.app, nodes) as grid:
        row = run_flower(grid, cfg, RunSettings(round_timeout=60.0, node_wait_timeout=5.0), out)
    return row, grid


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", FEDERATED)
def test_flower_and_in_process_hold_the_same_global_model(method, tiny_dir, small_data, tmp_path):
    threads = torch.get_num_threads()
    try:
        a = tmp_path / "in_process"
        b = tmp_path / "flower"
        row_a = run_in_process(config(method, tiny_dir, small_data, a), a)
        row_b, grid = run_on_flower(config(method, tiny_dir, small_data, b), b)
    finally:
        torch.set_num_threads(threads)

    # the same base-model row, rounds, losses and global model
    for key in ("global_loss", "local_loss"):
        assert row_b["base"][key] == pytest.approx(row_a["base"][key], abs=1e-6), key
        assert row_b[key] == pytest.approx(row_a[key], abs=1e-5), key
    for ma, mb in zip(metrics(a), metrics(b), strict=True):
        assert mb["sampled"] == ma["sampled"] and not mb["failed"]
        assert mb["train_loss"] == pytest.approx(ma["train_loss"], abs=1e-6)
        assert mb["eval"]["global"]["loss"] == pytest.approx(ma["eval"]["global"]["loss"], abs=1e-6)
        assert [c["loss"] for c in mb["eval"]["local"]["per_client"]] == pytest.approx(
            [c["loss"] for c in ma["eval"]["local"]["per_client"]], abs=1e-5)
    ga, gb = torch.load(a / "global_state.pt"), torch.load(b / "global_state.pt")
    assert set(ga) == set(gb) and all(torch.allclose(ga[k], gb[k], atol=1e-6) for k in ga)
    ea = load_file(a / "adapters" / "global" / "adapter_model.safetensors")
    eb = load_file(b / "adapters" / "global" / "adapter_model.safetensors")
    assert set(ea) == set(eb) and all(torch.allclose(ea[k], eb[k], atol=1e-6) for k in ea)
    for out in (a, b):
        table = (out / "results.md").read_text()
        assert "| base model |" in table and f"| {method} |" in table
        assert json.loads((out / "results.json").read_text())["base"]["method"] == "base model"

    # the global model is the server's own state: not the base model where anything is shared
    m = build_method(method, config(method, tiny_dir, small_data, a).method_options)
    b_factors = [v for k, v in ea.items() if "lora_B" in k]
    if m.shared and ({"B", "B.mag", "B.dir"} & set(m.shared)):
        assert any(torch.count_nonzero(v) for v in b_factors), "the global adapter is the base model"

    # one exchange per round: per node, a setup query, then one message a round (the base model's evaluation
    # rides on round 1's) and one closing message for the last round's local phase and evaluation
    kinds = [(s.metadata.dst_node_id, s.metadata.message_type) for s in grid.sent]
    for node in range(100, 100 + NODES):
        assert [k for n, k in kinds if n == node] == ["query.setup"] + ["train.round"] * 3, kinds

    # no reply that reached the server carries a personal-only component; only a training reply carries tensors
    personal_only = set(m.personal) - set(m.shared)
    for sent, reply in zip(grid.sent, grid.received, strict=True):
        kind = sent.metadata.message_type
        assert not reply.has_error(), reply.error.reason
        for name, rec in reply.content.array_records.items():
            assert kind == "train.round" and sent.content["fedlora"]["train"] and name == "update", (kind, name)
            comps = {component_of(k) for k in M.names(rec)}
            assert comps == set(m.shared) and not comps & personal_only, comps

    # the privacy audit, both directions: every message the server sent carries at most the shared components
    # (in `shared`), every config record holds no tensor, and no array in any message holds the value of a
    # client's personal state (which matters where a personal component shares its name with a shared one,
    # e.g. fedlora_opt's personal B.mag offset beside the global B.mag)
    for sent in grid.sent:
        assert set(sent.content.array_records) <= {"shared"}
        for rec in sent.content.array_records.values():
            assert {component_of(k) for k in M.names(rec)} == set(m.shared)
        for conf in sent.content.config_records.values():
            assert all(isinstance(v, (str, int, float, bool)) for v in conf.values())
    personal = [torch.load(p) for p in (b / "node-state").rglob("*.pt")]
    assert bool(personal) == bool(m.personal)  # durable on the nodes, for every method that has any
    values = [v for state in personal for v in state.values() if torch.count_nonzero(v)]
    for msg in grid.sent + grid.received:
        for rec in msg.content.array_records.values():
            arrays = M.from_record(rec, {})  # every tensor of the packed record, unpacked exactly
            assert list(arrays) == M.names(rec)
            for arr in arrays.values():
                assert not any(arr.shape == v.shape and torch.equal(arr.to(v.dtype), v) for v in values)
