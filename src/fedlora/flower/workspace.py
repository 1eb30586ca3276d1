"""The objects a Flower process works with: exactly those the in-process simulator builds.

`build_workspace(cfg)` loads the tokenizer and base model (`runner.Session`), builds the
federated data (same config and seed -> same partition on every machine) and a
`simulation.Simulation`, whose `method`, `am` (AdapterModel), `client` (FedClient), `server`
(Server), `evaluator`, `fmt` and `train_rows` the Flower apps use as they are. The server side
uses its `server` and `evaluator`; a client uses its `client` and its own rows and test split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from rich.console import Console

from ..config import Config, dump_config
from ..data.federated import FederatedData
from ..runner import Session
from ..simulation import Simulation

log = logging.getLogger("fedlora.flower")


@dataclass
class Workspace:
    cfg: Config
    data: FederatedData
    sim: Simulation
    device: str


def build_workspace(cfg: Config) -> Workspace:
    session = Session(cfg, Console(stderr=True))
    data = session.data(cfg)  # data first: bad data fails before the model loads
    model = session.base_model
    sim = Simulation(cfg, session.tokenizer, model, data, log=log.warning)
    return Workspace(cfg, data, sim, str(session.device))


_cached: dict[str, Workspace] = {}


def client_workspace(cfg: Config) -> Workspace:
    """A client's workspace, kept for the life of the process.

    Under Flower's simulation engine one process serves many messages (and several virtual
    clients, like the in-process simulator: one base model, states swapped in and out), so the
    model is loaded once. Under real SuperNodes every message runs in a fresh process.
    """
    key = dump_config(cfg)
    if key not in _cached:
        _cached.clear()
        _cached[key] = build_workspace(cfg)
    return _cached[key]
