"""Issue 16: the fixed cost of a Flower deployment round, against the same run in-process.

Starts a SuperLink and N SuperNodes on loopback (insecure, FLWR_HOME in a scratch folder), runs the project's
Flower app on them with `flwr run`, and the same config with `fedlora run` (the in-process simulator, a fresh
process); reads each run directory's metrics.jsonl and prints seconds per round of each arm and the ratio, all
measured in one invocation. The arms run one after another (interleaved if --repeats > 1), never at once.

  in-process    `fedlora run --config <the same config>`
  deployment    Flower's defaults: `flower-supernode --isolation subprocess` starts a `flower-superexec` that
                starts one `flwr-clientapp` process per message (imports torch/transformers/peft, loads the model)
  warm          (opt-in) `flower-supernode --isolation process` and, per node, ONE long-lived ClientApp worker:
                `fedlora flower worker` where the project has it, else this script with --serve-clientapps (the
                same code, `serve_clientapps`). It imports everything once, keeps the model loaded
                (fedlora.flower.workspace caches it per process) and runs every message of the node in-process,
                with the same Flower calls a `flwr-clientapp` process makes

Polling: a SuperNode with nothing to do looks for messages every 3 s (hard-coded in Flower 1.42,
`flwr.supernode.start_client_internal`); its SuperExec looks for tasks every FLWR_SUPEREXEC_TASK_POLL_INTERVAL
(default 1 s). --node-poll S starts each SuperNode through a small wrapper that shortens the first to S;
--superexec-poll S sets the second (and the warm workers' own interval).

A round's wall_time is the engine's (metrics.jsonl), the same definition in every runtime; the last round
includes the closing exchange (its local phase and evaluations), so it is longer.

Per reply, received.jsonl in the run directory has `seconds` (sent -> received at the server) and
`client_seconds` (inside the handler); their medians per arm are printed too. Every process started here is
stopped by PID with its descendants on exit, on an error and on Ctrl-C.

    .venv/bin/python benchmarks/deployment_round.py --model tiny                # quick check (~3 min)
    .venv/bin/python benchmarks/deployment_round.py                             # SmolLM2, 2 clients x 2 rounds
    .venv/bin/python benchmarks/deployment_round.py --arms in-process,deployment,warm --node-poll 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "databricks-dolly-15k.jsonl"
VENV_BIN = Path(sys.executable).parent
ARMS = ("in-process", "deployment", "warm")


# ----------------------------------------------------------------------------- the long-lived ClientApp worker


def serve_clientapps(address: str, insecure: bool, root_certificates: str | None, poll: float,
                     parent_pid: int | None) -> None:
    """Run every ClientApp task of one SuperNode (`flower-supernode --isolation process`) in THIS process.

    Does what `flower-superexec` + one `flwr-clientapp` per task do, minus the process per task: acquire a task
    from the SuperNode's Runtime API, then pull its message and context, install the FAB, load the ClientApp
    (cached in sys.modules after the first task), call it, push the reply and the context. The heavy imports
    happen once, before the first task, and `fedlora.flower.workspace` keeps the model between tasks.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    t = time.perf_counter()
    import fedlora.build  # noqa: F401  (torch, transformers, peft: what every train message needs)
    import fedlora.client_host  # noqa: F401
    import fedlora.flower.client_app  # noqa: F401
    import fedlora.flower.workspace  # noqa: F401
    print(f"[worker] imports {time.perf_counter() - t:.1f}s; serving ClientApp tasks of {address}", flush=True)
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)  # SIGINT to this process when the SuperNode is gone
    certificates = validate_and_resolve_root_certificates(root_certificates, insecure)
    acquire = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    try:
        while True:
            res = acquire.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                t = time.perf_counter()
                ok = run_one_task(address, res.token, insecure, certificates)
                print(f"[worker] task {res.task.task_id} {'done' if ok else 'FAILED'} in "
                      f"{time.perf_counter() - t:.2f}s", flush=True)
            else:
                time.sleep(poll)
    except KeyboardInterrupt:
        pass
    finally:
        acquire.close()


_INSTALLED: set[str] = set()


def run_one_task(address: str, token: str, insecure: bool, certificates: bytes | None) -> bool:
    """The body of flwr.supernode.runtime.run_clientapp.run_clientapp for one task, without exiting the process."""
    from logging import ERROR

    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry)
    heartbeat = message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    marks, t = [], time.perf_counter()

    def mark(what: str) -> None:
        nonlocal t
        now = time.perf_counter()
        marks.append(f"{what} {now - t:.2f}")
        t = now

    try:
        heartbeat = HeartbeatSender(_task_heartbeat_fn(client))
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        mark("pull")
        if fab.hash_str not in _INSTALLED:  # the same FAB for every task of a run: unpack it once
            install_from_fab(fab.content, skip_prompt=True)
            _INSTALLED.add(fab.hash_str)
        mark("install-fab")
        app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, fab.hash_str)
        mark("load-app")
        reply = app(message=message, context=context)
        mark(f"handler[{message.metadata.message_type}]")
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001  (as flwr-clientapp: the error goes back to the server)
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) \
            else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
                mark("push-reply")
        except Exception as ex:  # noqa: BLE001
            log(ERROR, "Failed to push reply message", exc_info=ex)
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        retry.max_tries = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        mark("push-context")
        client.close()
        print(f"[worker]   {', '.join(marks)}", flush=True)
    return status == SubStatus.COMPLETED


def pull_task_input(client):
    """flwr.supernode.runtime.run_clientapp.pull_task_input with a short retry backoff.

    The SuperNode makes a task acquirable as soon as a message's header has arrived, while it still pulls the
    message's objects (the arrays) from the SuperLink; an object that is not there yet is retried after 1 s,
    2 s, 4 s ... (Flower's PULL_INITIAL_BACKOFF = 1). A fresh flwr-clientapp process spends longer than that
    importing, so it rarely waits; a warm worker asks at once and would wait a whole second, every message.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=0.02, backoff_cap=0.5, max_tries_per_object=20000)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's: the deflated message lacks its id
    return message, context, run, fab


def _task_heartbeat_fn(client):
    """flwr.supercore.heartbeat.make_task_heartbeat_fn_http, except for a task the SuperNode no longer runs
    (stopped run, expired task): Flower's sends SIGINT to its process, which here would stop the worker and
    every later task with it. This one just stops beating; the task's reply, if any, is then refused."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=no-name-in-module

    def fn() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            raise
        if not res.success:
            raise SystemExit  # ends the heartbeat thread only
        return True

    return fn


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """What this script started, each in its own session; stopped by PID with their descendants.

    Descendants (SuperExec, ServerApp, ClientApp processes, workers) are recorded as psutil.Process objects while
    they run, so a PID that the system reuses for someone else's process is never touched.
    """

    def __init__(self, logdir: Path, env: dict):
        self.logdir, self.env = logdir, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict = {}
        self.logs = []
        self.clientapps: dict[int, list[float]] = {}
        """flwr-clientapp processes seen: pid -> [start time, last time seen running] (epoch seconds)."""

    def start(self, name: str, cmd: list[str], cwd: Path) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "w")
        self.logs.append(log)
        p = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        self.snapshot()
        return p

    def snapshot(self) -> None:
        import psutil

        for p in self.procs.values():
            if p.poll() is not None:
                continue
            try:
                root = self.seen.get(p.pid) or psutil.Process(p.pid)
                for q in [root, *root.children(recursive=True)]:
                    q = self.seen.setdefault(q.pid, q)
                    if q.pid in self.clientapps:
                        if q.status() != psutil.STATUS_ZOMBIE:  # exited but not yet reaped: not running
                            self.clientapps[q.pid][1] = time.time()
                    elif any("flwr-clientapp" in a for a in q.cmdline()[:2]):
                        self.clientapps[q.pid] = [q.create_time(), time.time()]
            except psutil.Error:
                pass

    def alive(self) -> list:
        import psutil

        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def stop_all(self) -> None:
        import psutil

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
        self.procs.clear()
        self.seen.clear()  # (clientapps is kept: the caller reads it, then resets it)
        for log in self.logs:
            log.close()
        self.logs.clear()

    def log(self, name: str) -> str:
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""


def wait_for_port(port: int, procs: Processes, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited:\n{procs.log(name)[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not open port {port} in {timeout:g}s")


def project_worker() -> bool:
    """Whether the installed project has `fedlora flower worker` (else this script's own copy serves the nodes)."""
    import importlib.util

    return importlib.util.find_spec("fedlora.flower.worker") is not None


def supernode_cmd(node_poll: float | None) -> list[str]:
    """flower-supernode; with node_poll, through a wrapper that shortens its 3 s idle poll to node_poll seconds."""
    if node_poll is None:
        return [str(VENV_BIN / "flower-supernode")]
    code = ("import sys, time, types\n"
            "import flwr.supernode.start_client_internal as s\n"
            "real = time.sleep\n"
            "s.time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith('__')})\n"
            f"s.time.sleep = lambda x: real(min(x, {node_poll!r}))\n"
            "sys.argv[0] = 'flower-supernode'\n"
            "from flwr.supernode.cli.flower_supernode import flower_supernode\n"
            "flower_supernode()\n")
    return [sys.executable, "-c", code]


# ----------------------------------------------------------------------------- the arms


def rounds_of(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [float(r["wall_time"]) for r in rows]


def received_of(out: Path) -> list[dict]:
    path = out / "received.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_in_process(args, work: Path, cfg_path: Path, env: dict, procs: Processes, tag: str) -> dict:
    out = work / f"{tag}-out"
    t = time.perf_counter()
    p = procs.start(tag, [str(VENV_BIN / "fedlora"), "run", "--config", str(cfg_path), "--out", str(out),
                          "--overwrite"], cwd=work)
    try:
        p.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"fedlora run did not finish in {args.timeout:g}s:\n{procs.log(tag)[-3000:]}") from None
    run_s = time.perf_counter() - t
    if p.returncode != 0 or not (out / "results.json").is_file():
        raise RuntimeError(f"fedlora run failed (exit {p.returncode}):\n{procs.log(tag)[-3000:]}")
    return {"rounds": rounds_of(out), "run": run_s, "out": out}


def run_deployment(args, work: Path, cfg_path: Path, env: dict, procs: Processes, tag: str, warm: bool) -> dict:
    """A SuperLink, one SuperNode per client (and per node a warm worker), `flwr run`; all stopped afterwards."""
    home = work / f"{tag}-flwr-home"
    home.mkdir()
    port = free_port()
    env = dict(env, FLWR_HOME=str(home))
    if args.superexec_poll is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(args.superexec_poll)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    procs.env = env
    procs.clientapps = {}
    out = work / f"{tag}-out"
    try:
        procs.start(f"{tag}-superlink", [str(VENV_BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                         "--port", str(port)], cwd=work)
        wait_for_port(port, procs, f"{tag}-superlink")
        for i in range(args.clients):
            rport = free_port()
            node_dir = work / f"{tag}-node{i}"
            node_config = (f'partition-id={i} num-partitions={args.clients} export-dir="{node_dir / "export"}" '
                           f'state-dir="{node_dir / "state"}"')
            node = procs.start(f"{tag}-node{i}", [*supernode_cmd(args.node_poll), "--insecure",
                                                  "--superlink", f"127.0.0.1:{port}", "--port", str(rport),
                                                  "--isolation", "process" if warm else "subprocess",
                                                  "--node-config", node_config], cwd=work)
            if warm:
                wait_for_port(rport, procs, f"{tag}-node{i}")
                poll = str(args.superexec_poll if args.superexec_poll is not None else 0.1)
                if project_worker():  # the project's own `fedlora flower worker`, where it has one
                    cmd = [str(VENV_BIN / "fedlora"), "flower", "worker", "--runtime-api-address",
                           f"127.0.0.1:{rport}", "--insecure", "--poll", poll, "--parent-pid", str(node.pid)]
                else:
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-clientapps", f"127.0.0.1:{rport}",
                           "--worker-poll", poll, "--parent-pid", str(node.pid)]
                procs.start(f"{tag}-worker{i}", cmd, cwd=work)
        run_config = {"config": str(cfg_path), "out": str(out), "overwrite": True,
                      "round-timeout": float(args.timeout), "node-wait-timeout": float(args.timeout)}
        rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        t = time.perf_counter()
        p = procs.start(f"{tag}-flwr-run", [str(VENV_BIN / "flwr"), "run", str(REPO), "bench", "--stream",
                                            "--run-config", rc], cwd=work)
        deadline = time.monotonic() + args.timeout
        while p.poll() is None and time.monotonic() < deadline:
            procs.snapshot()
            if (out / "results.json").is_file():
                break
            time.sleep(0.25)
        run_s = time.perf_counter() - t
        if not (out / "results.json").is_file():
            raise RuntimeError(f"the Flower run did not finish (flwr run exit {p.poll()}):\n"
                               f"{procs.log(f'{tag}-flwr-run')[-4000:]}")
        lives = [end - start for start, end in procs.clientapps.values()]
        return {"rounds": rounds_of(out), "run": run_s, "out": out, "received": received_of(out),
                "clientapps": lives}
    finally:
        procs.stop_all()


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), 'tiny' (random tiny LLaMA), hub id or dir")
    p.add_argument("--data", default=str(DOLLY), help="Dolly-format JSONL")
    p.add_argument("--method", default="fedlora_opt", help="any federated method of the project")
    p.add_argument("--clients", type=int, default=2, help="federation.clients = SuperNodes")
    p.add_argument("--rounds", type=int, default=2, help="federation.rounds")
    p.add_argument("--global-steps", type=int, default=2, help="train.global_steps")
    p.add_argument("--personal-steps", type=int, default=1, help="train.personal_steps")
    p.add_argument("--max-rows", type=int, default=200, help="data.max_rows (rows read, all clients)")
    p.add_argument("--threads", type=int, default=1, help="model.threads (torch threads per process)")
    p.add_argument("--device", default="cpu", help="model.device (every process)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--arms", default="in-process,deployment", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--repeats", type=int, default=1, help="runs of each arm, interleaved")
    p.add_argument("--node-poll", type=float, default=None,
                   help="SuperNode idle poll in seconds (default: Flower's 3 s; set: a wrapper shortens it)")
    p.add_argument("--superexec-poll", type=float, default=None,
                   help="FLWR_SUPEREXEC_TASK_POLL_INTERVAL (default: Flower's 1 s) and the warm workers' poll")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, run directories)")
    # the warm worker (started by this script for the `warm` arm)
    p.add_argument("--serve-clientapps", metavar="RUNTIME_API_ADDRESS", help=argparse.SUPPRESS)
    p.add_argument("--worker-poll", type=float, default=0.1, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        p.error(f"--arms: unknown {bad}; choose from {', '.join(ARMS)}")
    return args


def write_config(args, work: Path) -> Path:
    from fedlora.config import dump_config, load_config

    model = args.model
    if model == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from tiny import tiny_model, tiny_tokenizer

        model = work / "tiny-llama"
        tok = tiny_tokenizer()
        tiny_model(len(tok)).save_pretrained(model)
        tok.save_pretrained(model)
    elif Path(model).is_dir():
        model = Path(model).resolve()
    cfg = load_config(REPO / "configs" / "default.yaml", [
        f"method={args.method}", f"model.name={model}", f"model.device={args.device}",
        f"model.threads={args.threads}", f"data.path={Path(args.data).resolve()}", f"clients={args.clients}",
        f"rounds={args.rounds}", f"global_steps={args.global_steps}", f"personal_steps={args.personal_steps}",
        f"max_rows={args.max_rows}", "fraction=1.0", *args.set])
    path = work / "config.yaml"
    path.write_text(dump_config(cfg))
    return path


def fmt_rounds(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def median_or_nan(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve_clientapps:
        serve_clientapps(args.serve_clientapps, insecure=True, root_certificates=None, poll=args.worker_poll,
                         parent_pid=args.parent_pid)
        return 0

    def interrupted(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the clean-up
            signal.signal(sig, signal.SIG_IGN)
        print(f"{signal.Signals(signum).name} received", file=sys.stderr)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # stop_all runs on each (SIGINT even where a
        signal.signal(sig, interrupted)  # shell started this in the background with SIGINT ignored)
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="deployment_round-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads or 1),
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    procs = Processes(work, env)
    results: dict[str, list[dict]] = {a: [] for a in args.arms}
    try:
        cfg_path = write_config(args, work)
        print(f"deployment_round: {args.method}, {args.clients} clients x {args.rounds} rounds, "
              f"{args.global_steps}+{args.personal_steps} steps, max_rows {args.max_rows}, model {args.model}, "
              f"{args.threads} torch thread(s) per process; node poll "
              f"{'3 s (Flower)' if args.node_poll is None else f'{args.node_poll:g} s (patched)'}, SuperExec poll "
              f"{'1 s (Flower)' if args.superexec_poll is None else f'{args.superexec_poll:g} s'}")
        if "warm" in args.arms:
            print("warm: one long-lived ClientApp worker per node: " + (
                "`fedlora flower worker`" if project_worker() else "this script's --serve-clientapps"))
        print(f"machine: {os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.1f}; scratch {work}",
              flush=True)
        for r in range(args.repeats):
            for arm in args.arms:
                tag = f"{arm}-{r + 1}"
                load = os.getloadavg()[0]
                if arm == "in-process":
                    res = run_in_process(args, work, cfg_path, env, procs, tag)
                else:
                    res = run_deployment(args, work, cfg_path, env, procs, tag, warm=arm == "warm")
                procs.env = env
                res["load"] = (load, os.getloadavg()[0])
                results[arm].append(res)
                line = (f"  {tag:14s} round wall s: {fmt_rounds(res['rounds'])}; whole run {res['run']:.1f} s "
                        f"(load {res['load'][0]:.1f} -> {res['load'][1]:.1f})")
                rec = [e for e in res.get("received", []) if "client_seconds" in e]
                if rec:
                    line += (f"; per reply: sent->received median {median_or_nan([e['seconds'] for e in rec]):.2f} s"
                             f", in handler {median_or_nan([e['client_seconds'] for e in rec]):.2f} s")
                if res.get("clientapps"):
                    line += (f"; {len(res['clientapps'])} flwr-clientapp processes, median life "
                             f"{median_or_nan(res['clientapps']):.1f} s")
                print(line, flush=True)
    except KeyboardInterrupt:
        print("interrupted; stopping what this script started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if not args.keep and not args.workdir and all(results.values()):
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        elif args.keep or not all(results.values()):
            print(f"logs and run directories kept in {work}", file=sys.stderr)

    per_round = {a: median_or_nan([x for res in rs for x in res["rounds"]]) for a, rs in results.items()}
    print("seconds per round (median over rounds and repeats):")
    for a, s in per_round.items():
        runs = median_or_nan([res["run"] for res in results[a]])
        print(f"  {a:12s} {s:9.2f} s per round   (whole run {runs:.1f} s)")
    base = per_round.get("in-process")
    for a in args.arms:
        if a != "in-process" and base:
            print(f"ratio {a} / in-process per round: {per_round[a] / base:.1f}")
    if "deployment" in per_round and "warm" in per_round:
        print(f"ratio deployment / warm per round: {per_round['deployment'] / per_round['warm']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
