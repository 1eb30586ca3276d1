"""Driving a loopback Flower federation from a test: registering SuperNode keys, `flwr run` with a watcher."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

from fedlora.flower.localprocs import Processes

VENV_BIN = Path(sys.executable).parent


# `flwr supernode register KEY.pub test` for each key, in one process: the `flwr` console script's own entry point
# (flwr.cli.app:app) called once per key. The process imports the CLI while the SuperLink starts and registers as
# soon as its port is open: the CLI's imports (seconds each on a loaded machine) cost no extra time.
REGISTER = """import socket, sys, time
from flwr.cli.app import app
port, keys = int(sys.argv[1]), sys.argv[2:]
deadline = time.monotonic() + 120
while True:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            break
    assert time.monotonic() < deadline, "the SuperLink did not open its port"
    time.sleep(0.1)
for key in keys:
    app(["supernode", "register", "--format", "json", key, "test"], prog_name="flwr", standalone_mode=False)
"""


def start_registering(procs: Processes, port: int, public_keys: list[Path]) -> subprocess.Popen:
    """Registers the keys with the SuperLink on `port` (once it listens) as `flwr supernode register` does."""
    return procs.start("register", [sys.executable, "-c", REGISTER, str(port), *map(str, public_keys)],
                       cwd=procs.logdir)


def registered_ids(procs: Processes, expected: int, timeout: float = 120) -> list[int]:
    """The node IDs the SuperLink gave the registered keys, in order."""
    try:
        rc = procs.procs["register"].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"registering did not finish in {timeout}s:\n{procs.log('register')[-3000:]}") from None
    ids = [int(i) for i in re.findall(r'"node-id":\s*(\d+)', procs.log("register"))]
    assert rc == 0 and len(ids) == expected, f"registering failed (rc {rc}):\n{procs.log('register')[-3000:]}"
    return ids


class Federation:
    def __init__(self, d: Path, procs: Processes, env: dict):
        self.dir, self.procs, self.env = d, procs, env
        self.runs = 0
        self.registered: list[int] = []  # the node IDs `flwr supernode register` got for node0..node2
        self.stranger_key = b""  # the unregistered probe's public key (PEM), as the SuperLink logs it

    def run(self, run_config: dict, timeout: float = 240, during=None, out: Path | None = None) -> Path:
        """`flwr run <repo> test --stream --run-config ...`; returns the run directory when the run has finished.

        `during(out)` is called while it runs until it returns True; if it returns "stop", the `flwr run`
        process is stopped and the run directory returned as it is (the run did not finish).
        """
        self.runs += 1
        name = f"run{self.runs}"
        out = out or self.dir / name
        rc = " ".join(f"{k}={json.dumps(v)}" for k, v in {**run_config, "out": str(out)}.items())
        p = self.procs.start(name, [str(VENV_BIN / "flwr"), "run", str(REPO), "test", "--stream",
                                    "--run-config", rc], cwd=self.dir)
        deadline = time.monotonic() + timeout
        while p.poll() is None and time.monotonic() < deadline:
            self.procs.snapshot()
            if during is not None:
                said = during(out)
                if said == "stop":
                    self.procs.kill(name)
                    return out
                if said:
                    during = None
            time.sleep(0.25)
        if p.poll() is None:
            raise TimeoutError(f"the run did not finish in {timeout}s:\n{self.procs.log(name)[-4000:]}")
        assert (out / "results.json").is_file(), f"no results.json; flwr run said:\n{self.procs.log(name)[-4000:]}"
        return out
