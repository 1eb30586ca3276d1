"""Flower processes on this machine (SuperLink, SuperNodes, workers, `flwr run`), started and stopped by PID.

For the tests and benchmarks that run a federation on loopback (tests/test_flower*.py,
benchmarks/deployment_round.py); nothing in a run uses it. Each process starts in its own session with its
output in `<logdir>/<name>.log`. Its descendants (SuperExec, ServerApp, ClientApp processes) are recorded while
they run as psutil.Process objects, which know their start time: a PID the system has reused for someone
else's process is never touched.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    def __init__(self, logdir: Path, env: dict):
        self.logdir, self.env = logdir, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, psutil.Process] = {}
        self.clientapps: dict[int, list[float]] = {}
        """flwr-clientapp processes seen: pid -> [start time, last time seen running] (epoch seconds)."""
        self._logs = []

    def start(self, name: str, cmd: list[str], cwd: Path) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "w")
        self._logs.append(log)
        p = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        self.seen.pop(p.pid, None)  # a PID of an earlier, finished process
        self.tree(p.pid)
        return p

    def tree(self, pid: int) -> list[psutil.Process]:
        """The process `pid` and its descendants now, recorded."""
        try:
            root = self._known(pid) or psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for i, p in enumerate(procs):
            procs[i] = p = self._known(p.pid) or p
            self.seen[p.pid] = p
            self._note_clientapp(p)
        return procs

    def _known(self, pid: int) -> psutil.Process | None:
        p = self.seen.get(pid)
        return p if p is not None and p.is_running() else None  # is_running: same PID AND same start time

    def _note_clientapp(self, p: psutil.Process) -> None:
        try:
            if p.pid in self.clientapps:
                if p.status() != psutil.STATUS_ZOMBIE:  # exited but not yet reaped: not running
                    self.clientapps[p.pid][1] = time.time()
            elif any(Path(a).name == "flwr-clientapp" for a in p.cmdline()[:2]):
                self.clientapps[p.pid] = [p.create_time(), time.time()]
        except psutil.Error:
            pass

    def snapshot(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                self.tree(p.pid)

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        """Stop one process and everything under it (a SuperNode: its SuperExec and ClientApp processes)."""
        procs = self.tree(self.procs[name].pid)
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=15)
        try:
            self.procs[name].wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.procs[name].kill()
            self.procs[name].wait(timeout=5)

    def stop_all(self) -> None:
        """SIGTERM to every process still running (with its descendants), SIGKILL to what is left after 10 s."""
        self.snapshot()
        live = self.alive()
        for p in live:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, live = psutil.wait_procs(live, timeout=10)
        for p in live:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(live, timeout=10)
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for log in self._logs:
            log.close()
        self._logs.clear()

    def alive(self) -> list[psutil.Process]:
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""


def wait_for_port(port: int, procs: Processes, name: str, timeout: float = 120) -> None:
    """Until something listens on 127.0.0.1:`port`; an error if process `name` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited:\n{procs.log(name)[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not open port {port} in {timeout:g}s")
