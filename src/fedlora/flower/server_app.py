"""The Flower ServerApp: the round engine (`fedlora.engine.RoundEngine`) with Flower carrying its requests.

The ServerApp builds the server's side only (`workspace.server_side`: the `Server`, the global test
sets it holds, if any, and the model to evaluate the global model it holds), waits for the client nodes,
and drives the same engine and the same run-directory writer (`fedlora.rundir.run_engine`) as `fedlora
run`, over a `FlowerTransport`: one exchange per round. The global model is the server's state, as in every
runtime. With a shared dataset (run config client-data=partition) the server evaluates it on the global
test set; with clients' own data (client-data=own) the server holds no client data and every
reachable client scores it on its own test split (federated evaluation, example-weighted), and the
server also scores it on the `global-test` file if one is given. Local models are evaluated on the
clients' nodes, and their adapters exported there (node config export-dir).

A client that fails or has not answered within `round-timeout` is left out of that exchange (logged in
the round's `failed`); a round aggregates what arrived if at least `min-replies` did.

Every `output.checkpoint_every` rounds the server writes a checkpoint of what it holds (global state,
server optimizer state, metrics so far, the open round, the run's id on the nodes and its clients' names;
`fedlora.checkpoint`). Run config `resume=true` continues from the last complete one. Client sampling and
every client phase are seeded by (seed, round[, client, phase]), so there is no sampler state to save.
Personal components live on the nodes, durable in their state directories, one per run id: a node asked
to repeat a phase (after a resume) starts it from the personal state it started from the first time.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .. import results as res
from ..checkpoint import Checkpoint, CheckpointError, check_resume, open_for_resume
from ..config import Config, dump_config
from ..core.methods import build_method
from ..engine import RoundEngine
from ..errors import ConfigError
from ..rundir import run_engine
from .settings import RunSettings
from .transport import FlowerTransport
from .workspace import server_side


def say(line: str) -> None:
    print(line, flush=True)


def run_flower(grid: Grid, cfg: Config, settings: RunSettings, out: Path, resume: Checkpoint | None = None) -> dict:
    """One experiment on a Flower grid, written into `out`."""
    if build_method(cfg.method, cfg.method_options, rank=cfg.lora.r).pooled:
        raise ConfigError("method: 'centralized' pools all data in one place and has no federated deployment; "
                          "run it with `fedlora run`")
    if resume is not None and resume.state.get("runtime") != "flower":
        raise CheckpointError(f"run config resume: {resume.path} was written by `fedlora run` (the in-process "
                              f"simulator); resume it with `fedlora run --resume {out}`")
    ss = server_side(cfg, settings)
    if resume is not None and ss.data.fingerprint != resume.fingerprint and not settings.force:
        raise CheckpointError(f"run config resume: the data differ from the run's (fingerprint "
                              f"{resume.fingerprint}, now {ss.data.fingerprint}, data.path={cfg.data.path}); set "
                              f"force=true to continue anyway")
    transport = FlowerTransport(grid, settings, cfg.federation.clients, dump_config(cfg), ss.data.fingerprint, out,
                                say=say)
    if resume is not None:
        transport.load_state_dict(resume.state)  # the run's id on the nodes and its clients' names, before setup
    engine = RoundEngine(cfg, ss.side.method, ss.server, ss.evaluator, transport, ss.side.am.init_state, log=say,
                         min_replies=settings.min_replies, federated_eval=settings.client_data == "own")
    try:
        transport.connect()
        row = run_engine(engine, out, ss.data, resume=resume, say=say, am=ss.side.am, provenance={
            "device": ss.device, "nodes": {str(c): n for c, n in sorted(transport.nodes.items())},
            "run_settings": settings.as_run_config()})
    finally:
        transport.close()
    say(f"results written to {out}/")
    return row


def make_server_app(defaults: dict | None = None) -> ServerApp:
    """A ServerApp; `defaults` are run-config values that the run's own run config overrides."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = RunSettings.from_run_config({**(defaults or {}), **dict(context.run_config)})
        cfg = settings.load()
        ckpt = None
        if settings.resume:
            out = Path(cfg.output.dir)
            ckpt, skipped, finished = open_for_resume(out, "run config resume")
            if check_resume(out, ckpt, finished, cfg, force=settings.force, label="run config resume",
                            force_hint="resume with the run's config and set, or set force=true"):
                say(f"{out}: the run already finished ({cfg.federation.rounds} rounds); nothing to do")
                return
            for name, why in skipped.items():
                say(f"checkpoint {name} is incomplete ({why}); using {ckpt.path.name}")
        else:
            out = res.prepare_run_dir(cfg.output.dir, cfg.output.overwrite)
        run_flower(grid, cfg, settings, out, resume=ckpt)

    return server_app


app = make_server_app()
