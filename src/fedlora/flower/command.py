"""`fedlora flower simulate`: the Flower app under Flower's simulation engine (Ray), N virtual SuperNodes;
`fedlora flower worker`: one long-lived process that serves every ClientApp message of a SuperNode
(`flower-supernode --isolation process`; see worker.py).

For real deployment (flower-superlink, flower-supernode, flwr run) see docs/deployment.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from rich.console import Console

from ..errors import UserError


def register(subparsers) -> None:
    flower = subparsers.add_parser(
        "flower", help="run on Flower (simulation engine here; a SuperNode's ClientApp worker; SuperLink/SuperNodes: "
                       "see docs/deployment.md)")
    sub = flower.add_subparsers(dest="flower_command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "simulate",
        help="run one experiment with the Flower app on Flower's simulation engine",
        description="Runs the project's ServerApp and ClientApp with flwr.simulation.run_simulation: one virtual "
                    "SuperNode per client (federation.clients), each with its partition-id. Writes the same run "
                    "directory as `fedlora run`.",
    )
    p.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set rounds=5 (repeatable)")
    p.add_argument("--out", "-o", help="run directory (default: output.dir from the config)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run directory (--out or output.dir) from the server's last checkpoint; "
                        "the virtual nodes' personal state is in its node-state/ directory")
    p.add_argument("--force", action="store_true", help="with --resume: continue even if config or data differ")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per virtual client (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per virtual client (default 0; e.g. 0.5)")
    p.add_argument("--min-replies", type=int, default=1,
                   help="fewest replies with which a round still aggregates (default 1)")
    p.add_argument("--round-timeout", type=float, default=3600.0,
                   help="seconds to wait for the replies of one phase (default 3600)")
    p.set_defaults(handler=cmd_simulate)

    w = sub.add_parser(
        "worker",
        help="serve every ClientApp message of one SuperNode (started with --isolation process) in one process",
        description="Takes the ClientApp tasks of a SuperNode started with `flower-supernode --isolation process` "
                    "from its Runtime API and runs them in this one process, keeping the model loaded between "
                    "messages (instead of one flwr-clientapp process per message). Runs until SIGTERM/SIGINT. "
                    "See docs/deployment.md.",
    )
    w.add_argument("--runtime-api-address", default="127.0.0.1:9094", metavar="HOST:PORT",
                   help="the SuperNode's Runtime (ClientAppIo) API: its --host and --port (default 127.0.0.1:9094)")
    w.add_argument("--insecure", action="store_true",
                   help="the Runtime API is plain HTTP (the SuperNode's default: no --ssl-certfile)")
    w.add_argument("--root-certificates", metavar="CA.pem",
                   help="the CA that signed the SuperNode's --ssl-certfile (instead of --insecure)")
    w.add_argument("--superexec-auth-secret-file", metavar="FILE",
                   help="the secret file the SuperNode was given with --superexec-auth-secret-file, if any")
    w.add_argument("--poll", type=float, default=0.2,
                   help="seconds between looks for a new task when idle (default 0.2; flower-superexec: 1)")
    w.add_argument("--connect-timeout", type=float, default=60.0,
                   help="seconds to wait for the SuperNode's Runtime API to answer (at start, and if it goes "
                        "away) before giving up (default 60)")
    w.add_argument("--parent-pid", type=int, default=None,
                   help="stop when this process (e.g. the SuperNode) exits")
    w.set_defaults(handler=cmd_worker)


def cmd_worker(args: argparse.Namespace, console: Console) -> int:
    import logging

    from .worker import serve

    logging.getLogger("flwr").propagate = False  # flwr logs through its own handler; no second (DEBUG) copy
    return serve(args.runtime_api_address, insecure=args.insecure, root_certificates=args.root_certificates,
                 auth_secret_file=args.superexec_auth_secret_file, poll=args.poll,
                 connect_timeout=args.connect_timeout, parent_pid=args.parent_pid,
                 say=lambda line: print(line, flush=True))


def cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    from .. import results as res
    from .settings import RunSettings

    if args.num_cpus <= 0 or args.num_gpus < 0:
        raise UserError("--num-cpus must be > 0 and --num-gpus >= 0")
    settings = RunSettings.from_run_config({
        "config": str(Path(args.config).resolve()) if args.config else "",
        "set": shlex.join(args.set), "out": args.out or "", "overwrite": args.overwrite,
        "resume": args.resume, "force": args.force,
        "min-replies": args.min_replies, "round-timeout": args.round_timeout,
    })
    cfg = settings.load()  # bad config or data: one line, before Ray starts
    from ..data.federated import build_federated_data, load_examples

    build_federated_data(cfg, *load_examples(cfg, warn=lambda m: console.print(f"[yellow]{m}")))
    if args.resume:  # the ServerApp checks again; here the refusals come before Ray starts
        from ..checkpoint import check_resume, open_for_resume

        out = Path(cfg.output.dir)
        ckpt, _, finished = open_for_resume(out, "--resume")
        if check_resume(out, ckpt, finished, cfg, force=args.force, label="--resume",
                        force_hint="resume without --config/--set changes, or pass --force"):
            console.print(f"{out}: the run already finished ({cfg.federation.rounds} rounds); nothing to do")
            return 0
    else:
        out = res.prepare_run_dir(cfg.output.dir, cfg.output.overwrite)

    import logging

    from flwr.simulation import run_simulation

    from .client_app import app as client_app
    from .server_app import make_server_app

    logging.getLogger("flwr").propagate = False  # flwr logs through its own handler; no second copy
    # the virtual nodes keep their personal state in the run directory (Ray's workers inherit the environment)
    os.environ.setdefault("FEDLORA_NODE_STATE_DIR", str(out.resolve() / "node-state"))
    console.print(f"Flower simulation: {cfg.federation.clients} virtual clients, method {cfg.method}, "
                  f"{cfg.federation.rounds} rounds")
    run_simulation(
        server_app=make_server_app(settings.as_run_config()),
        client_app=client_app,
        num_supernodes=cfg.federation.clients,
        backend_config={"client_resources": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}},
    )
    if not (out / "results.json").is_file():
        raise UserError(f"the Flower simulation did not finish (no {out / 'results.json'}); see the log above")
    print()
    print((out / "results.md").read_text())
    console.print(f"results written to {out}/ (results.json, results.md, metrics.jsonl, curves.png, adapters/)")
    return 0
