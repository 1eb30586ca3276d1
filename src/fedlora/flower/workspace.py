"""What a Flower process builds, and keeps for its life: a node's client, or the server's side.

`client_host(cfg, cid)`: the tokenizer, the base model with the method's adapter and ONE client's rows
(`build.build_host`): no server, no other client's data. Under Flower's simulation engine one process
serves several virtual nodes, so the model side is built once per config and shared by the clients it
hosts (each with its own personal store, from its own `Context`); under real SuperNodes each message
runs in a fresh process.

`server_side(cfg)`: the data (for the global test sets), the model side, the `Server` and the
`GlobalEvaluator`: what the ServerApp needs to aggregate and to evaluate the global model it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from ..build import ModelSide, build_host, build_model_side, build_server
from ..client_host import ClientHost
from ..config import Config, dump_config
from ..core.server import Server
from ..data.federated import FederatedData
from ..evaluator import GlobalEvaluator
from ..runner import Session


def _load(cfg: Config) -> tuple[FederatedData, ModelSide, str]:
    session = Session(cfg, Console(stderr=True))
    data = session.data(cfg)  # data first: bad data fails before the model loads
    session.load_model()
    side = build_model_side(cfg, session.tokenizer, session.base_model)
    return data, side, str(session.device)


_sides: dict[str, tuple[FederatedData, ModelSide, str]] = {}
_hosts: dict[tuple[str, int], ClientHost] = {}


def client_host(cfg: Config, cid: int) -> ClientHost:
    key = dump_config(cfg)
    if key not in _sides:
        _sides.clear()
        _hosts.clear()
        _sides[key] = _load(cfg)
    if (key, cid) not in _hosts:
        data, side, _ = _sides[key]
        _hosts[(key, cid)] = build_host(cfg, side, data, [cid])
    return _hosts[(key, cid)]


@dataclass
class ServerSide:
    data: FederatedData
    side: ModelSide
    server: Server
    evaluator: GlobalEvaluator
    device: str


def server_side(cfg: Config) -> ServerSide:
    data, side, device = _load(cfg)
    return ServerSide(data, side, build_server(cfg, side), GlobalEvaluator(side.am, side.fmt, data, cfg), device)
