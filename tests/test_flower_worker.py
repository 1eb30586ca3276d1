"""`fedlora flower worker`: SuperNodes started with `--isolation process`, each served by ONE worker process.

A real SuperLink and three real SuperNodes on loopback, `flwr run`, the tiny model; the run equals the
in-process run of the same config, and every message of a node was served by its one worker (the same PID for
the setup query and all three `train.round` messages; no `flwr-clientapp` or `flower-superexec` process ever
ran). Without the workers nobody takes the nodes' tasks and the run cannot finish.

Insecure (no TLS, no SuperNode authentication), unlike test_flower.py's federation: what the worker changes is
the node side (the SuperNode's Runtime API on loopback, plain HTTP by default in both set-ups), not the link
to the SuperLink, and the insecure variant starts in a fraction of the time (no CA, no key registration).
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from test_flower import VENV_BIN, Federation, assets, max_diff, reference  # noqa: F401  (assets, reference: fixtures)

from fedlora.flower.localprocs import Processes, free_port, wait_for_port

NODES = 3
DONE = re.compile(r"^worker (\d+): node (\d+) (\S+) \(run \d+\): done in", re.M)


def test_supernodes_served_by_one_worker_each_equal_the_in_process_run(assets, reference, tmp_path):
    d = tmp_path
    (d / "flwr_home").mkdir()
    port = free_port()
    env = dict(os.environ, FLWR_HOME=str(d / "flwr_home"), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2")  # the SuperLink's SuperExec (its ServerApp process)
    (d / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    procs = Processes(d, env)
    try:
        procs.start("superlink", [str(VENV_BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                  "--port", str(port)], cwd=d)
        wait_for_port(port, procs, "superlink")
        for i in range(NODES):  # the commands of docs/deployment.md, "One worker per SuperNode"
            api = free_port()
            procs.start(f"node{i}", [str(VENV_BIN / "flower-supernode"), "--insecure", "--superlink",
                                     f"127.0.0.1:{port}", "--isolation", "process", "--port", str(api),
                                     "--node-config", f'partition-id={i} num-partitions={NODES} '
                                                      f'state-dir="{d / "state"}"'], cwd=d)
            procs.start(f"worker{i}", [str(VENV_BIN / "fedlora"), "flower", "worker", "--insecure",
                                       "--runtime-api-address", f"127.0.0.1:{api}"], cwd=d)
        out = Federation(d, procs, env).run({"config": str(assets["config"]), "round-timeout": 120.0},
                                            timeout=300)

        # the same run as in process
        sim = reference
        diff = max_diff(torch.load(out / "global_state.pt"), sim.server.global_state)
        assert diff <= 1e-6, f"global adapter differs from the in-process run's by {diff}"
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["round"] for m in metrics] == [1, 2]
        for m, h in zip(metrics, sim.history, strict=True):
            assert m["sampled"] == h.sampled and not m["failed"]
            assert m["train_loss"] == pytest.approx(h.train_loss, abs=1e-6)
            assert m["local_phase_loss"] == pytest.approx(h.local_phase_loss, abs=1e-6)
        assert [c["loss"] for c in metrics[-1]["eval"]["local"]["per_client"]] == pytest.approx(
            [c["loss"] for c in sim.history[-1].eval["local"]["per_client"]], abs=1e-5)

        # every message of a node was served by its one worker: as many tasks done by that worker's PID as
        # replies from the node reached the server, and no process per message
        received = [json.loads(line) for line in (out / "received.jsonl").read_text().splitlines()]
        assert not any(r["error"] for r in received)
        per_node: dict[int, list[str]] = {}
        for r in received:
            per_node.setdefault(r["node"], []).append(r["phase"])
        assert len(per_node) == NODES
        served: dict[int, set[int]] = {}
        for i in range(NODES):
            done = DONE.findall(procs.log(f"worker{i}"))
            assert {int(pid) for pid, _, _ in done} == {procs.procs[f"worker{i}"].pid}, procs.log(f"worker{i}")
            nodes = {int(node) for _, node, _ in done}
            assert len(nodes) == 1, f"worker {i} served nodes {nodes}"
            node = nodes.pop()
            assert sorted(kind for _, _, kind in done) == sorted(per_node[node]) == \
                ["query.setup"] + ["train.round"] * 3
            served.setdefault(node, set()).add(procs.procs[f"worker{i}"].pid)
        assert set(served) == set(per_node) and all(len(p) == 1 for p in served.values())
        procs.snapshot()
        nodes = {str(procs.procs[f"node{i}"].pid) for i in range(NODES)}
        spawned = [c for c in map(_cmdline, procs.seen.values()) if _per_task(c, nodes)]
        assert not spawned, f"processes per task ran: {spawned}"

        # SIGTERM stops a worker cleanly (exit 0, one line)
        procs.procs["worker0"].send_signal(signal.SIGTERM)
        assert procs.procs["worker0"].wait(timeout=30) == 0, procs.log("worker0")[-3000:]
        assert "SIGTERM received; stopped" in procs.log("worker0")
    finally:
        procs.stop_all()
    assert not procs.alive()


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001  (gone since)
        return []


def _per_task(cmd: list[str], nodes: set[str]) -> bool:
    """A flwr-clientapp anywhere, or a SuperExec of a node (the SuperLink's own runs its ServerApp)."""
    names = [Path(a).name for a in cmd[:2]]
    parent = cmd[cmd.index("--parent-pid") + 1] if "--parent-pid" in cmd[:-1] else None
    return "flwr-clientapp" in names or ("flower-superexec" in names and parent in nodes)


def test_worker_refuses_bad_flags_and_an_unreachable_node_with_one_line(capsys):
    from fedlora.cli import main

    for argv, words in [(["--runtime-api-address", "nohost"], "is not HOST:PORT"),
                        (["--runtime-api-address", "127.0.0.1:9094"], "give exactly one of --insecure"),
                        (["--insecure", "--poll", "0"], "--poll must be between"),
                        (["--insecure", "--runtime-api-address", f"127.0.0.1:{free_port()}", "--connect-timeout",
                          "1"], "cannot reach the SuperNode's Runtime API at 127.0.0.1:")]:
        assert main(["flower", "worker", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (argv, err)
