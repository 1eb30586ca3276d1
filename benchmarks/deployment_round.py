"""Issue 16: the fixed cost of a Flower deployment round, against the same run in-process.

Starts a SuperLink and N SuperNodes on loopback (insecure, FLWR_HOME in a scratch folder), runs the project's
Flower app on them with `flwr run`, and the same config with `fedlora run` (the in-process simulator, a fresh
process); reads each run directory's metrics.jsonl and prints seconds per round of each arm and the ratio, all
measured in one invocation. The arms run one after another (interleaved if --repeats > 1), never at once.

  in-process    `fedlora run --config <the same config>`
  deployment    Flower's defaults: `flower-supernode --isolation subprocess` starts a `flower-superexec` that
                starts one `flwr-clientapp` process per message (imports torch/transformers/peft, loads the model)
  warm          (opt-in) `flower-supernode --isolation process` and, per node, ONE long-lived ClientApp worker,
                `fedlora flower worker` (fedlora.flower.worker): it imports everything once, keeps the model
                loaded and runs every message of the node in its one process

Both Flower arms send a message's tensors packed into one array (fedlora.flower.messages).

Polling: a SuperNode with nothing to do looks for messages every 3 s (hard-coded in Flower 1.42,
`flwr.supernode.start_client_internal`); its SuperExec looks for tasks every FLWR_SUPEREXEC_TASK_POLL_INTERVAL
(default 1 s). --node-poll S starts each SuperNode through a small wrapper that shortens the first to S (a
patch of Flower for measuring only; not in the project); --superexec-poll S sets the second (and the warm
workers' --poll, 0.2 s by default).

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedlora.flower.localprocs import Processes, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "databricks-dolly-15k.jsonl"
VENV_BIN = Path(sys.executable).parent
ARMS = ("in-process", "deployment", "warm")


# ----------------------------------------------------------------------------- processes


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
            if warm:  # the node's one ClientApp process (docs/deployment.md, "One worker per SuperNode")
                poll = str(args.superexec_poll if args.superexec_poll is not None else 0.2)
                procs.start(f"{tag}-worker{i}", [str(VENV_BIN / "fedlora"), "flower", "worker", "--insecure",
                                                 "--runtime-api-address", f"127.0.0.1:{rport}", "--poll", poll,
                                                 "--parent-pid", str(node.pid)], cwd=work)
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
        served = sum(procs.log(f"{tag}-worker{i}").count("): done in") for i in range(args.clients)) if warm else 0
        return {"rounds": rounds_of(out), "run": run_s, "out": out, "received": received_of(out),
                "clientapps": lives, "worker_tasks": served}
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
                if res.get("worker_tasks"):
                    line += f"; {res['worker_tasks']} messages served by {args.clients} workers"
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
