"""The Flower app on loopback: a real SuperLink and three real SuperNodes (subprocesses), `flwr run`, over TLS
with SuperNode authentication (set up with the commands docs/deployment.md gives), each node a client with its
own data file and the server with none (run config client-data=own).

Checks: the final global adapter, the federated global evaluation and the local evaluations equal the in-process
run of the same clients; one exchange per round; no reply that reached the server holds a personal component;
the personal state on a node changed across rounds (durable in its state directory, and equal to the in-process
run's); a ServerApp killed mid-checkpoint resumes to the same result; a SuperNode with an unregistered key, and
one without TLS, are refused. (A node killed mid-round, restarted, or joining late, and the server dying and
resuming with restarted nodes: tests/test_federation.py, on the same ServerApp/ClientApp code without processes,
in seconds instead of minutes of CI.)
Every process the tests start is stopped by PID (with its descendants), pass or fail."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from certs import node_key, public_key_pem, tls_certificates
from conftest import DOLLY
from flowerkit import VENV_BIN, Federation, registered_ids, start_registering

from fedlora.config import dump_config, load_config
from fedlora.core.components import component_of
from fedlora.flower.localprocs import Processes, free_port, wait_for_port

NODES = 3


# ----------------------------------------------------------------------------- fixtures


def small_dolly(path: Path, every: int = 150) -> Path:
    """Every 150th row of the real Dolly file (the file is grouped by category): 101 rows, all categories."""
    assert DOLLY.is_file(), f"the shared Dolly file is missing: {DOLLY}"
    with open(DOLLY) as f:
        rows = [line for i, line in enumerate(f) if i % every == 0]
    path.write_text("".join(rows))
    return path


def tiny_model_dir(path: Path) -> Path:
    from tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("flower_assets")
    model = tiny_model_dir(d / "tiny-llama")
    data = small_dolly(d / "dolly_small.jsonl")
    cfg = load_config(None, [
        "method=fedlora_opt", "seed=0", f"model.name={model}", "model.device=cpu", "model.threads=1",
        f"data.path={data}", "partition=dirichlet", "data.alpha=1.0", "max_length=64", "global_test_per_label=2",
        "clients=3", "rounds=2", "global_steps=2", "personal_steps=2", "train.batch_size=2", "train.lr=0.01",
        "max_examples_per_client=4", "max_global_examples=8", "max_gen_examples=1", "max_new_tokens=4",
    ])
    (d / "config.yaml").write_text(dump_config(cfg))
    rows = data.read_text().splitlines(keepends=True)
    sites = []
    for k, (lo, hi) in enumerate([(0, 30), (30, 60), (60, len(rows))]):  # each client's own file
        sites.append(d / f"site{k}.jsonl")
        sites[-1].write_text("".join(rows[lo:hi]))
    return {"dir": d, "model": model, "data": data, "config": d / "config.yaml", "cfg": cfg, "sites": sites}


@pytest.fixture(scope="module")
def federation(assets, tmp_path_factory):
    """flower-superlink + three flower-supernode processes on loopback, FLWR_HOME in a temp dir; set up as
    docs/deployment.md says for real machines: TLS (a private CA, made with the doc's commands) and SuperNode
    authentication (a key per node, registered with `flwr supernode register`; the SuperLink admits no other).

    Two probes start with the nodes and are refused (test_deployment_refuses_...): `stranger`, a SuperNode with
    a key that was never registered, and `plaintext`, one without TLS."""
    d = tmp_path_factory.mktemp("flower_federation")
    home = d / "flwr_home"
    home.mkdir()
    port = free_port()
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2",  # SuperExecs look for new work every 0.2 s (default 1 s)
               FEDLORA_FAULT=f"@{d / 'fault'}")  # a test writes e.g. checkpoint@2 there to kill the ServerApp
    tls = tls_certificates(d)
    keys = {name: node_key(d / "keys" / name) for name in [*(f"node{i}" for i in range(NODES)), "stranger"]}
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{tls["ca"]}"\n')
    supernode = [str(VENV_BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}"]
    procs = Processes(d, env)
    try:
        procs.start("superlink", [str(VENV_BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
                                  "--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                                  "--ssl-keyfile", str(tls["key"]), "--enable-supernode-auth"], cwd=d)
        start_registering(procs, port, [keys[f"node{i}"][1] for i in range(NODES)])
        wait_for_port(port, procs, "superlink")
        registered = registered_ids(procs, NODES)
        for i in range(NODES):
            node_config = (f'data-path="{assets["sites"][i]}" client-name="site-{i}" state-dir="{d / "state"}" '
                           f'export-dir="{d / f"node{i}"}"')
            procs.start(f"node{i}", [*supernode, "--root-certificates", str(tls["ca"]),
                                     "--auth-supernode-private-key", str(keys[f"node{i}"][0]),
                                     "--port", str(free_port()), "--node-config", node_config], cwd=d)
        # the probes need no ClientApp processes (--isolation process: no SuperExec under them)
        procs.start("stranger", [*supernode, "--root-certificates", str(tls["ca"]), "--auth-supernode-private-key",
                                 str(keys["stranger"][0]), "--isolation", "process", "--port", str(free_port())],
                    cwd=d)
        procs.start("plaintext", [*supernode, "--insecure", "--max-retries", "0", "--isolation", "process",
                                  "--port", str(free_port())], cwd=d)
        fed = Federation(d, procs, env)
        fed.registered, fed.stranger_key = registered, public_key_pem(keys["stranger"][1])
        yield fed
    finally:
        procs.stop_all()
        left = procs.alive()
        assert not left, f"processes left running: {[(p.pid, p.cmdline()) for p in left]}"


@pytest.fixture(scope="module")
def reference(assets):
    """The in-process simulator on the same config (same code path as `fedlora run`)."""
    from rich.console import Console

    from fedlora.runner import Session
    from fedlora.simulation import Simulation

    cfg = assets["cfg"]
    threads = torch.get_num_threads()
    try:
        session = Session(cfg, Console(quiet=True))
        data = session.data(cfg)
        model = session.base_model
        sim = Simulation(cfg, session.tokenizer, model, data, log=lambda m: None)
        sim.run()
        return sim
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def own_reference(assets):
    """The same three clients with their own files, in process (ids in the order of their names)."""
    from rich.console import Console

    from fedlora.data.federated import FederatedData, own_client_data
    from fedlora.data.sources import read_records, to_examples
    from fedlora.runner import Session
    from fedlora.simulation import Simulation

    cfg = assets["cfg"]
    threads = torch.get_num_threads()
    try:
        clients = [own_client_data(cfg, to_examples(read_records(str(f)), cfg.data.field_map, source=str(f)))
                   for f in assets["sites"]]
        session = Session(cfg, Console(quiet=True))
        session.load_model()
        sim = Simulation(cfg, session.tokenizer, session.base_model, FederatedData(clients=clients, global_test={}),
                         log=lambda m: None)
        sim.engine.federated_eval = sim.engine.want_base = True
        sim.run()
        return sim
    finally:
        torch.set_num_threads(threads)


def node_personal(federation, out: Path, cid: int) -> dict:
    """Client `cid`'s newest personal state in its node's state directory, for the run in `out`."""
    run_id = torch.load(sorted((out / "checkpoints").glob("round-*"))[-1] / "state.pt")["flower"]["run_id"]
    return torch.load(sorted((federation.dir / "state" / run_id / f"site-{cid}").glob("r*.pt"))[-1])


OWN = {"client-data": "own"}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- tests


def make_message(kind: str, content, rnd: int = 1):
    from flwr.app import Message, Metadata

    meta = Metadata(run_id=1, message_id="", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                    group_id=str(rnd), created_at=time.time(), ttl=600, message_type=kind)
    return Message(content=content, metadata=meta)


def test_client_app_in_process_keeps_personal_state_on_disk(assets, tmp_path):
    """The ClientApp's handler called directly, with the sequential pipeline (a global, then a local phase): same
    numbers as the simulator, B.mag only in the node's state directory, and the upload does not depend on the
    personal state (nothing personal leaves the node, even by value)."""
    import dataclasses

    from flwr.app import ConfigRecord, Context, RecordDict
    from rich.console import Console

    from fedlora.core.components import select
    from fedlora.flower import client_app, messages as M
    from fedlora.personal import DiskPersonalStore
    from fedlora.runner import Session
    from fedlora.simulation import Simulation

    cfg = assets["cfg"]
    cfg = dataclasses.replace(cfg, method_options=dataclasses.replace(cfg.method_options, pipeline="sequential"))
    threads = torch.get_num_threads()
    session = Session(cfg, Console(quiet=True))
    data, model = session.data(cfg), session.base_model  # they load the tokenizer
    sim = Simulation(cfg, session.tokenizer, model, data, log=lambda m: None)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 2, "num-partitions": 3,
                                                    "state-dir": str(tmp_path)}, state=RecordDict(), run_config={})
    initial = select(sim.am.init_state, sim.method.shared)  # what a fresh server sends in round 1
    conf = {"config": dump_config(cfg), "run-id": "r1", "client-id": 2}
    store = DiskPersonalStore(tmp_path / "r1" / "partition-2", 2)

    def exchange(rnd: int, train: bool, local: bool):
        flags = {"train": train, "train-round": rnd}
        if local:
            flags.update({"task-round": rnd - 1, "local": True, "evaluate": False, "evaluate-global": False,
                          "base": False})
        return client_app.app(make_message(M.ROUND, RecordDict({M.CONFIG: ConfigRecord({**conf, **flags}),
                                                                 M.SHARED: M.to_record(initial)})), ctx)

    reply = exchange(1, train=True, local=False)
    keys = M.names(reply.content[M.UPDATE])
    assert keys and {component_of(k) for k in keys} == set(sim.method.shared)
    expected = sim.client.global_phase(2, 1, initial, None, sim.train_rows[2])  # the simulator's call
    assert max_diff(M.from_record(reply.content[M.UPDATE], {}), expected.update.state) == 0.0
    assert not reply.content.config_records and set(reply.content.array_records) == {M.UPDATE}
    assert store.get(2) is None  # the global phase trains the global B.mag, not the personal one
    reply = exchange(2, train=False, local=True)  # round 1's local phase (on the same shared state), no training
    assert not reply.content.array_records and "local-loss" in reply.content[M.METRICS]
    first = store.get(2)
    assert first and {component_of(k) for k in first} == {"B.mag"}
    assert [p.name for p in sorted((tmp_path / "r1" / "partition-2").iterdir())] == ["r000001-local.pt"]
    assert not ctx.state.array_records  # nothing in Flower's Context: the disk is the node's memory
    # a node with a trained personal B.mag (round 2 starts from it) uploads exactly what a fresh node uploads
    again = exchange(2, train=True, local=False)
    fresh = sim.client.global_phase(2, 2, initial, None, sim.train_rows[2])
    assert max_diff(M.from_record(again.content[M.UPDATE], {}), fresh.update.state) == 0.0
    torch.set_num_threads(threads)


def test_flower_simulate_command_matches_simulator(assets, reference, tmp_path):
    """`fedlora flower simulate` (flwr.simulation.run_simulation on Ray): same global adapter as in process."""
    procs = Processes(tmp_path, dict(os.environ, FLWR_HOME=str(tmp_path / "flwr_home"), FLWR_TELEMETRY_ENABLED="0",
                                     FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0",
                                     TOKENIZERS_PARALLELISM="false"))
    out = tmp_path / "run"
    try:
        p = procs.start("simulate", [str(VENV_BIN / "fedlora"), "flower", "simulate", "--config",
                                     str(assets["config"]), "--out", str(out)], cwd=tmp_path)
        deadline = time.monotonic() + 240
        while p.poll() is None and time.monotonic() < deadline:
            procs.snapshot()
            time.sleep(0.25)
        assert p.poll() == 0, procs.log("simulate")[-4000:]
    finally:
        procs.stop_all()
    assert not procs.alive(), "processes left running after the simulation"
    assert max_diff(torch.load(out / "global_state.pt"), reference.server.global_state) <= 1e-6
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_loss"] for m in metrics] == pytest.approx([h.train_loss for h in reference.history], abs=1e-6)
    for f in ("results.json", "results.md", "config.yaml", "curves.png", "adapters/global/adapter_config.json"):
        assert (out / f).is_file(), f


def test_deployment_refuses_unregistered_and_plaintext_supernodes(federation):
    """The fixture's probes: a SuperNode whose key was never registered and one without TLS are refused at once
    (they exit); the registered nodes come online, and the SuperLink activates no other node. (The runs of the
    tests below then complete on this federation.)"""
    procs = federation.procs
    deadline = time.monotonic() + 90
    for name in ("stranger", "plaintext"):
        while procs.procs[name].poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert procs.procs[name].poll() not in (None, 0), f"{name} was not refused:\n{procs.log(name)[-3000:]}"
        assert "Failed to initialize the connection to the SuperLink" in procs.log(name), procs.log(name)[-3000:]
        assert "SuperNode ID:" not in procs.log(name)
    assert "Failed to activate SuperNode" in procs.log("stranger")
    link = procs.log("superlink")
    refused = [line for line in link.splitlines() if "No SuperNode found with the given public key" in line]
    assert any(str(federation.stranger_key) in line for line in refused), link[-3000:]

    def activated() -> set[int]:
        return {int(i) for i in re.findall(r"Activated node_id=(\d+)", procs.log("superlink"))}

    while activated() != set(federation.registered) and time.monotonic() < deadline + 60:
        assert activated() <= set(federation.registered), f"unregistered nodes activated: {activated()}"
        time.sleep(0.5)
    assert activated() == set(federation.registered), procs.log("superlink")[-3000:]
    for i, node_id in enumerate(federation.registered):
        assert f"SuperNode ID: {node_id}" in procs.log(f"node{i}")


def test_deployment_with_own_data_matches_in_process_and_keeps_personal_state_on_nodes(assets, own_reference,
                                                                                      federation):
    out = federation.run({"config": str(assets["config"]), "round-timeout": 120.0, **OWN})
    sim = own_reference

    # (a) the final global adapter, the rounds and the federated and local evaluations equal the in-process run's
    diff = max_diff(torch.load(out / "global_state.pt"), sim.server.global_state)
    assert diff <= 1e-6, f"global adapter differs from the in-process run's by {diff}"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    for m, h in zip(metrics, sim.history):
        assert m["sampled"] == h.sampled and not m["failed"]
        assert m["train_loss"] == pytest.approx(h.train_loss, abs=1e-6)
        assert m["local_phase_loss"] == pytest.approx(h.local_phase_loss, abs=1e-6)
        assert m["examples"] == h.examples and m["bytes_up"] == h.bytes_up
    last, sim_last = metrics[-1]["eval"], sim.history[-1].eval
    assert last["global"] == last["federated"] and last["federated"]["clients"] == NODES
    assert last["global"]["loss"] == pytest.approx(sim_last["global"]["loss"], abs=1e-5)
    assert [c["loss"] for c in last["local"]["per_client"]] == pytest.approx(
        [c["loss"] for c in sim_last["local"]["per_client"]], abs=1e-5)
    for f in ("results.json", "results.md", "metrics.jsonl", "config.yaml", "curves.png",
              "adapters/global/adapter_config.json"):
        assert (out / f).is_file(), f

    # (b) one exchange per round, and the server never received a personal component
    received = [json.loads(line) for line in (out / "received.jsonl").read_text().splitlines()]
    assert not any(r["error"] for r in received)
    assert sorted((r["phase"], r["round"]) for r in received) == sorted(
        [("query.setup", 0)] * NODES + [("train.round", r) for r in (1, 2, 3) for _ in range(NODES)])
    # the default keeps a global B.mag on the server besides each client's personal B.mag (an offset from it):
    # a training reply carries the global phase's B.mag; the personal one is in no reply (the closing replies
    # carry no tensors; test_client_app_...: the upload does not depend on the personal state)
    assert set(sim.method.personal) == {"B.mag"} and set(sim.method.shared) == {"A.dir", "A.mag", "B.dir", "B.mag"}
    for r in received:
        for name, keys in r.get("arrays", {}).items():
            assert r["phase"] == "train.round" and r["round"] <= 2 and name == "update", r
            assert {component_of(k) for k in keys} == set(sim.method.shared)
    assert all(not r.get("arrays") for r in received if r["round"] == 3)

    # (c) the personal state on each node changed across rounds, is durable in its state directory, and is the
    # in-process run's
    for cid in range(NODES):
        final = node_personal(federation, out, cid)
        assert {component_of(k) for k in final} == {"B.mag"}
        assert max_diff(final, sim.personal[cid]) <= 1e-6
        assert (federation.dir / f"node{cid}" / "adapter" / "adapter_model.safetensors").is_file()

    flower_wall = [m["wall_time"] for m in metrics]
    sim_rounds = [h.wall_time for h in sim.history]
    print(f"\nwall time per round: deployment {flower_wall} s, in-process {sim_rounds} s (tiny model, 3 clients)")


def test_server_app_killed_mid_checkpoint_resumes_to_the_same_result(assets, own_reference, federation):
    """SIGKILL the ServerApp while it writes round 2's checkpoint (a torn checkpoint); `resume=true` continues
    from round 1's (round 1 aggregated, its local phase to run again on the nodes, from the personal state in
    their state directories) and ends with the uninterrupted run's global adapter, metrics and personal state."""
    fault = federation.dir / "fault"
    out = federation.dir / "resumed"
    config = {"config": str(assets["config"]), "round-timeout": 120.0, **OWN}

    def died_in_checkpoint_2(out: Path):
        torn = out / "checkpoints" / ".round-000002.tmp" / "config.yaml"
        if not torn.is_file():
            return False
        time.sleep(1.0)  # the ServerApp kills itself right after writing that file
        return "stop"

    fault.write_text("checkpoint@2")
    try:
        federation.run(config, out=out, during=died_in_checkpoint_2)
    finally:
        fault.unlink()
    assert not (out / "results.json").is_file()
    assert (out / "checkpoints" / "round-000001" / "manifest.json").is_file()
    assert not (out / "checkpoints" / "round-000002").exists()
    assert (out / "checkpoints" / ".round-000002.tmp").is_dir()  # torn: never loaded

    federation.run({**config, "resume": True}, out=out)
    sim = own_reference
    diff = max_diff(torch.load(out / "global_state.pt"), sim.server.global_state)
    assert diff <= 1e-6, f"resumed global adapter differs from the simulator's by {diff}"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    for m, h in zip(metrics, sim.history):
        assert m["train_loss"] == pytest.approx(h.train_loss, abs=1e-6)
        assert m["local_phase_loss"] == pytest.approx(h.local_phase_loss, abs=1e-6)
    flower_local = metrics[-1]["eval"]["local"]["per_client"]
    assert [c["loss"] for c in flower_local] == pytest.approx(
        [c["loss"] for c in sim.history[-1].eval["local"]["per_client"]], abs=1e-5)
    for cid in range(NODES):
        assert max_diff(node_personal(federation, out, cid), sim.personal[cid]) <= 1e-6
    log = federation.procs.log(f"run{federation.runs}")
    assert "resuming after round 1" in log
    assert json.loads((out / "results.json").read_text())["provenance"]["resumed"] is True
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-000001", "round-000002"]

    # (a resume with another config is refused: test_federation.py, on the same ServerApp code)
