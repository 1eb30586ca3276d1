"""What a Flower process builds, and keeps for its life: a node's client, or the server's side.

`client_host(cfg, cid, node)`: the tokenizer, the base model with the method's adapter and ONE client's
rows (`build.build_host`): its partition of the shared dataset, or its own data (`node_data`); no server,
no other client's data. The model side is built once per config and process and shared by the clients it
hosts (each with its own personal store): under Flower's simulation engine one process serves several virtual
nodes; a `fedlora flower worker` serves every message of its SuperNode (`--isolation process`); Flower's own
`flwr-clientapp` runs each message in a fresh process. Torch, transformers and peft are imported only where
a model is built, so a process that answers only the setup query (data only) starts in a fraction of the time.

`server_side(cfg, settings)`: the model side, the `Server` and the `GlobalEvaluator` with the global test
sets the server holds: the dataset's (shared-dataset runs), an optional `global-test` file, or none (clients
with their own data: the global model is then scored by federated evaluation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Config, dump_config
from ..data.federated import ClientData, FederatedData
from .settings import NodeSettings, RunSettings

if TYPE_CHECKING:  # torch, transformers, peft: imported by the functions that build a model, not at import
    from ..build import ModelSide
    from ..client_host import ClientHost
    from ..core.server import Server
    from ..evaluator import GlobalEvaluator


def _session(cfg: Config):
    from rich.console import Console

    from ..runner import Session

    return Session(cfg, Console(stderr=True))


def _model_side(cfg: Config) -> tuple[ModelSide, str]:
    from ..build import build_model_side

    session = _session(cfg)
    session.load_model()
    return build_model_side(cfg, session.tokenizer, session.base_model), str(session.device)


_data: dict[tuple[str, str], tuple[ClientData, str]] = {}
_sides: dict[str, tuple[ModelSide, str]] = {}
_hosts: dict[tuple[str, str, int], ClientHost] = {}


def node_data(cfg: Config, node: NodeSettings) -> tuple[ClientData, str]:
    """This node's client rows and the fingerprint of the data it read (cached per process)."""
    from ..data.federated import build_federated_data, load_examples, own_client_data
    from ..data.sources import fingerprint

    key = (dump_config(cfg), node.key)
    if key not in _data:
        if len(_data) >= 8:  # a process serves a few nodes at most (Flower's simulation engine, tests)
            _data.clear()
        examples, unseen = load_examples(cfg, warn=print)
        if node.own_data:
            _data[key] = (own_client_data(cfg, examples), fingerprint(examples))
        else:
            data = build_federated_data(cfg, examples, unseen)
            _data[key] = (data.clients[node.partition_id], data.fingerprint)
    return _data[key]


def _model_key(cfg: Config) -> str:
    """What the model side depends on: the config without the node's data path."""
    return dump_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path="")))


def client_host(cfg: Config, cid: int, node: NodeSettings) -> ClientHost:
    """Client `cid` (the id the server gave this node) with this node's rows, on the model of this process."""
    from ..build import build_host

    key = _model_key(cfg)
    if key not in _sides:
        _sides.clear()
        _hosts.clear()
        node_data(cfg, node)  # bad data fails before the model loads
        _sides[key] = _model_side(cfg)
    if (key, node.key, cid) not in _hosts:
        side, _ = _sides[key]
        _hosts[(key, node.key, cid)] = build_host(cfg, side, {cid: node_data(cfg, node)[0]})
    return _hosts[(key, node.key, cid)]


@dataclass
class ServerSide:
    data: FederatedData
    """The global test sets the server holds (no client rows when clients bring their own data)."""
    side: ModelSide
    server: Server
    evaluator: GlobalEvaluator
    device: str


def server_side(cfg: Config, settings: RunSettings) -> ServerSide:
    from ..build import build_server
    from ..evaluator import GlobalEvaluator

    if settings.client_data == "own":
        data = _global_test_only(cfg, settings.global_test)
    else:
        data = _session(cfg).data(cfg)  # data first: bad data fails before the model loads
    side, device = _model_side(cfg)
    return ServerSide(data, side, build_server(cfg, side), GlobalEvaluator(side.am, side.fmt, data, cfg), device)


def _global_test_only(cfg: Config, path: str) -> FederatedData:
    """The server's data when clients bring their own: none, or the rows of a `global-test` file by label."""
    from ..data.sources import fingerprint, read_records, to_examples

    if not path:
        return FederatedData(clients=[], global_test={}, fingerprint="")
    examples = to_examples(read_records(path, warn=print), cfg.data.field_map, source=path, warn=print)
    by_label: dict = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    return FederatedData(clients=[], global_test=dict(sorted(by_label.items())), fingerprint=fingerprint(examples),
                         labels=sorted(by_label))
