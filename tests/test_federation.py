"""A real federation's cases on the real ServerApp and ClientApp code, over `LoopbackGrid` (Flower's wire format,
one Context per node, no network, no processes; the real SuperLink/SuperNodes are in test_flower.py):

  * clients with their own data (node config data-path, no partition-id) and a server that reads none: the
    global model is scored by federated evaluation, and the numbers equal the in-process run of the same clients;
  * the failures of a real federation: the server dies and resumes from its checkpoint with restarted nodes, a
    node is killed and restarted between rounds, a node joins late. Each run finishes; where the fault drops no
    client, the result equals the uninterrupted run.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DOLLY
from loopback_grid import LoopbackGrid
from rich.console import Console
from test_runtimes import config, metrics, small_data  # noqa: F401  (small_data: a fixture)

from fedlora.checkpoint import open_for_resume
from fedlora.core.components import component_of
from fedlora.flower import client_app, messages as M
from fedlora.flower.server_app import run_flower
from fedlora.flower.settings import RunSettings

NODES = 3


@pytest.fixture(scope="module")
def site_files(tmp_path_factory):
    """Three clients' own files: different rows of Dolly, different sizes."""
    d = tmp_path_factory.mktemp("sites")
    rows = [line for i, line in enumerate(open(DOLLY)) if i % 97 == 0][:120]
    files = []
    for k, (lo, hi) in enumerate([(0, 25), (25, 60), (60, 120)]):
        files.append(d / f"site{k}.jsonl")
        files[-1].write_text("".join(rows[lo:hi]))
    return files


@pytest.fixture
def threads_restored():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(grid: LoopbackGrid, cfg, out, resume=None, **settings):
    settings = {"round_timeout": 5.0, "node_wait_timeout": 2.0, **settings}
    with grid:
        return run_flower(grid, cfg, RunSettings(**settings), out, resume=resume)


def test_clients_with_their_own_data_and_a_server_with_none(tiny_dir, site_files, tmp_path, threads_restored, capsys):
    from fedlora.data.federated import FederatedData, own_client_data
    from fedlora.data.sources import read_records, to_examples
    from fedlora.runner import Session
    from fedlora.simulation import Simulation

    out, state = tmp_path / "flower", tmp_path / "node-state"
    # the server's data.path does not exist: it must read no client data
    cfg = config("fedlora_opt", tiny_dir, tmp_path / "nowhere.jsonl", out, "eval.every=1", "output.checkpoint_every=1",
                 "method_options.pipeline=sequential")  # the node copies a local phase's personal state too
    names = {200: "site-c", 201: "site-a", 202: "site-b"}  # ids come from the names' order: a=0, b=1, c=2
    nodes = {n: {"data-path": str(site_files[i]), "client-name": names[n], "state-dir": str(state)}
             for i, n in enumerate(names)}
    nodes[203] = {"partition-id": 0, "state-dir": str(state)}  # a node of the other mode is refused at setup
    out.mkdir()
    grid = LoopbackGrid(client_app.app, nodes)
    run(grid, cfg, out, client_data="own")
    said = capsys.readouterr().out
    assert "node 203 cannot take part" in said and "the run expects clients with their own data" in said
    assert "client 0: node 201, site-a" in said and "client 2: node 200, site-c" in said

    rows = metrics(out)
    assert [r["round"] for r in rows] == [1, 2] and not any(r["failed"] for r in rows)
    for r in rows:
        fed = r["eval"]["federated"]
        assert r["eval"]["global"] == fed and fed["clients"] == NODES
        per = fed["per_client"]
        n = sum(c["examples"] for c in per)
        assert fed["examples"] == n and fed["loss"] == pytest.approx(sum(c["loss"] * c["examples"] for c in per) / n)
        assert all(0 < c["examples"] <= cfg.eval.max_examples_per_client for c in per)
    result = json.loads((out / "results.json").read_text())
    assert result["base_eval"]["global"]["loss"] == pytest.approx(result["base_eval"]["federated"]["loss"])

    # the same clients in one process (their own splits, ids in name order) give the same numbers
    def own(path):
        return own_client_data(cfg, to_examples(read_records(str(path)), cfg.data.field_map, source=str(path)))

    data = FederatedData(clients=[own(site_files[1]), own(site_files[2]), own(site_files[0])], global_test={})
    session = Session(cfg, Console(quiet=True))
    session.load_model()
    sim = Simulation(cfg, session.tokenizer, session.base_model, data, log=lambda m: None)
    sim.engine.federated_eval = sim.engine.want_base = True
    sim.run()
    assert sim.engine.base_eval["global"]["loss"] == pytest.approx(result["base_eval"]["global"]["loss"], abs=1e-6)
    for r, h in zip(rows, sim.history, strict=True):
        assert r["train_loss"] == pytest.approx(h.train_loss, abs=1e-6)
        assert r["eval"]["global"]["loss"] == pytest.approx(h.eval["global"]["loss"], abs=1e-5)
        assert [c["loss"] for c in r["eval"]["local"]["per_client"]] == pytest.approx(
            [c["loss"] for c in h.eval["local"]["per_client"]], abs=1e-5)
    g = torch.load(out / "global_state.pt")
    assert all(torch.allclose(g[k], sim.server.global_state[k], atol=1e-6) for k in g)

    # personal state stayed on the nodes, durable in their state directories, one per run and client
    run_id = torch.load(sorted((out / "checkpoints").glob("round-*"))[-1] / "state.pt")["flower"]["run_id"]
    for name in ("site-a", "site-b", "site-c"):
        copies = sorted(p.name for p in (state / run_id / name).glob("*.pt"))
        assert "r000002-local.pt" in copies, copies
    personal_only = set(sim.method.personal) - set(sim.method.shared)
    for msg in grid.sent + grid.received:
        for rec in msg.content.array_records.values() if msg.has_content() else ():
            assert not {component_of(k) for k in M.names(rec)} & personal_only


def test_own_data_mode_mismatch_and_settings_are_one_line():
    from fedlora.errors import ConfigError
    from fedlora.flower.settings import NodeSettings

    for conf, words in [({}, "give 'partition-id'"), ({"data-path": "x", "num-partitions": 3}, "needs 'partition-id'"),
                        ({"partition-id": 0, "client-name": "a"}, "'client-name' is for a client with its own")]:
        with pytest.raises(ConfigError, match=words) as e:
            NodeSettings.from_node_config(conf)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="client-data"):
        RunSettings.from_run_config({"client-data": "mine"})
    with pytest.raises(ConfigError, match="global-test"):
        RunSettings.from_run_config({"global-test": "t.jsonl"})
    assert NodeSettings.from_node_config({"data-path": "/d/x.jsonl", "client-name": "h1"}).key == "h1"


# ----------------------------------------------------------------------------- failures


def partition_nodes(state, first_id=100):
    return {first_id + i: {"partition-id": i, "num-partitions": NODES, "state-dir": str(state)} for i in range(NODES)}


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    out.mkdir()
    threads = torch.get_num_threads()
    try:
        run(LoopbackGrid(client_app.app, partition_nodes(out.parent / "state")), fault_config(tiny_dir, small_data, out),
            out)
    finally:
        torch.set_num_threads(threads)
    return out


def fault_config(tiny_dir, small_data, out):
    return config("fedlora_opt", tiny_dir, small_data, out, "rounds=3", "eval.every=1", "output.checkpoint_every=1")


def assert_same_run(out, ref):
    a, b = metrics(out), metrics(ref)
    assert [r["round"] for r in a] == [r["round"] for r in b]
    for x, y in zip(a, b):
        assert x["sampled"] == y["sampled"] and not x["failed"]
        for key in ("train_loss", "local_phase_loss"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), key
        assert x["eval"]["global"]["loss"] == pytest.approx(y["eval"]["global"]["loss"], abs=1e-6)
        assert [c["loss"] for c in x["eval"]["local"]["per_client"]] == pytest.approx(
            [c["loss"] for c in y["eval"]["local"]["per_client"]], abs=1e-6)
    ga, gb = torch.load(out / "global_state.pt"), torch.load(ref / "global_state.pt")
    assert all(torch.allclose(ga[k], gb[k], atol=1e-6) for k in ga)


class ServerDied(Exception):
    pass


def test_server_dies_and_resumes_from_its_checkpoint_with_restarted_nodes(tiny_dir, small_data, uninterrupted,
                                                                          tmp_path, threads_restored):
    """The ServerApp (and the SuperLink with it) dies as it sends round 3; the nodes come back with new node ids;
    `resume` continues from round 2's checkpoint (round 2 aggregated, its local phase still to run): the nodes
    run it again from the personal state they hold on disk, and the run ends as the uninterrupted one."""
    out, state = tmp_path / "run", tmp_path / "state"
    out.mkdir()
    cfg = fault_config(tiny_dir, small_data, out)

    def die_at_round_3(grid, messages):
        if any(m.metadata.message_type == M.ROUND and m.content[M.CONFIG]["train-round"] == 3 for m in messages):
            raise ServerDied

    grid = LoopbackGrid(client_app.app, partition_nodes(state))
    grid.before_push = die_at_round_3
    with pytest.raises(ServerDied):
        run(grid, cfg, out)
    ckpt, _, finished = open_for_resume(out, "resume")
    assert ckpt.round == 2 and not finished and len(metrics(out)) == 1  # round 2 is open: its local phase is due
    run(LoopbackGrid(client_app.app, partition_nodes(state, first_id=500)), cfg, out, resume=ckpt)
    assert_same_run(out, uninterrupted)

    # the ServerApp's own entry point refuses a resume with another config, one line, and changes nothing
    from flwr.app import Context, RecordDict

    from fedlora.checkpoint import CheckpointError
    from fedlora.config import dump_config
    from fedlora.flower.server_app import make_server_app

    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    before = sorted((p.name, p.stat().st_size) for p in out.rglob("*"))
    ctx = Context(run_id=2, node_id=1, node_config={}, state=RecordDict(), run_config={
        "config": str(tmp_path / "config.yaml"), "out": str(out), "resume": True, "set": "rounds=4"})
    with LoopbackGrid(client_app.app, partition_nodes(state, first_id=700)) as grid:
        with pytest.raises(CheckpointError, match="the config differs from the run's") as e:
            make_server_app()(grid, ctx)
    assert "\n" not in str(e.value) and sorted((p.name, p.stat().st_size) for p in out.rglob("*")) == before


def test_node_killed_and_restarted_between_rounds_continues_its_personal_state(tiny_dir, small_data, uninterrupted,
                                                                               tmp_path, threads_restored, capsys):
    out, state = tmp_path / "run", tmp_path / "state"
    out.mkdir()
    restarted = []

    def restart_client_1(grid, messages):
        """Killed after round 2's exchange (its personal B.mag has been trained in round 1's local phase), back
        with a new node id before round 3's."""
        if not restarted and any(m.metadata.message_type == M.ROUND and m.content[M.CONFIG]["train-round"] == 2
                                 for m in messages):
            grid.add_node(301, grid.remove_node(101))
            restarted.append(301)

    grid = LoopbackGrid(client_app.app, partition_nodes(state))
    grid.after_push = restart_client_1
    run(grid, fault_config(tiny_dir, small_data, out), out)
    said = capsys.readouterr().out
    assert "client 1 (node 101) is offline" in said and "client 1: node 301" in said
    assert metrics(out)[2]["nodes"]["1"] == 301
    assert_same_run(out, uninterrupted)


def test_a_node_that_joins_late_takes_part_from_then_on(tiny_dir, small_data, tmp_path, threads_restored, capsys):
    out, state = tmp_path / "run", tmp_path / "state"
    out.mkdir()
    nodes = partition_nodes(state)
    late = nodes.pop(102)

    def join(grid, messages):
        if 102 not in grid.contexts and any(m.metadata.message_type == M.ROUND for m in messages):
            grid.add_node(102, late)

    grid = LoopbackGrid(client_app.app, nodes)
    grid.after_push = join
    run(grid, fault_config(tiny_dir, small_data, out), out, min_nodes=2)
    rows = metrics(out)
    assert rows[0]["failed"] == {"2": "no node for this client"} and rows[0]["sampled"] == [0, 1, 2]
    assert not rows[1]["failed"] and not rows[2]["failed"]
    assert not rows[2]["eval"]["local"]["per_client"][2].get("missing")
    assert json.loads((out / "results.json").read_text())["base_eval"]["local"]["per_client"][2]["missing"]


@pytest.mark.parametrize("mode", ["local", "central"])
def test_differential_privacy_on_flower_equals_in_process(mode, tiny_dir, small_data, tmp_path, threads_restored):
    """DP on the Flower runtime: local noise is added on the nodes, central noise on the server; the same noisy
    global model and the same ε per round as in process."""
    from test_runtimes import run_in_process

    sets = ["rounds=2", "clients=3", f"privacy.mode={mode}", "privacy.clipping_norm=0.5",
            "privacy.noise_multiplier=0.8", "privacy.delta=1e-3"]
    a, b = tmp_path / "in_process", tmp_path / "flower"
    run_in_process(config("fedit", tiny_dir, small_data, a, *sets), a)
    b.mkdir()
    run(LoopbackGrid(client_app.app, partition_nodes(tmp_path / "state")), config("fedit", tiny_dir, small_data, b,
                                                                                  *sets), b)
    ra, rb = metrics(a), metrics(b)
    eps = [r["privacy"]["epsilon"] for r in rb]
    assert eps == pytest.approx([r["privacy"]["epsilon"] for r in ra]) and eps[0] < eps[1]
    ga, gb = torch.load(a / "global_state.pt"), torch.load(b / "global_state.pt")
    assert all(torch.allclose(ga[k], gb[k], atol=1e-6) for k in ga)


def test_a_node_killed_mid_round_is_left_out_and_the_run_goes_on(tiny_dir, small_data, tmp_path, threads_restored, capsys):
    """Node 102 dies as round 1 is sent (its message is never answered): client 2 fails that exchange after
    round-timeout, the round aggregates the others (min-replies 2), and the run finishes."""
    out, state = tmp_path / "run", tmp_path / "state"
    out.mkdir()

    def kill_102(grid, messages):
        if 102 in grid.contexts and any(m.metadata.message_type == M.ROUND for m in messages):
            grid.remove_node(102)

    grid = LoopbackGrid(client_app.app, partition_nodes(state))
    grid.before_push = kill_102
    run(grid, config("fedlora_opt", tiny_dir, small_data, out, "rounds=1"), out, round_timeout=1.0, min_replies=2)
    m = metrics(out)[0]
    assert m["failed"] == {"2": "no reply within 1s"} and m["examples"] > 0 and not m["rejected"]
    assert m["eval"]["local"]["per_client"][2].get("missing") and m["eval"]["local"]["per_client"][0]["loss"]
    assert "client 2 (node 102) failed" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["summary"]["global_loss"] is not None
