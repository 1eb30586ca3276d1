"""Builders of the pieces a runtime assembles, from a config: the same pieces in every runtime.

  * `ModelSide`: the method, its adapter on the base model and the prompt formatter (server and clients);
  * `build_server`: the server's aggregation state (`core.server.Server`);
  * `build_host`: the clients hosted in one process (`ClientHost`), with only their own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .adapters import AdapterModel
from .client_host import ClientHost
from .core.components import transfer_dtype
from .core.dp import DPOptions
from .core.methods import Method, build_method
from .core.robust import RobustOptions
from .core.server import Server
from .core.server_opt import build_server_optimizer
from .data.federated import ClientData
from .data.prompts import PromptFormatter
from .evaluator import eval_rows
from .personal import PersonalStore


@dataclass
class ModelSide:
    method: Method
    am: AdapterModel
    fmt: PromptFormatter
    pad_id: int


def build_model_side(cfg, tokenizer, base_model) -> ModelSide:
    method = build_method(cfg.method, cfg.method_options, rank=cfg.lora.r)
    am = AdapterModel.for_method(base_model, method, cfg)
    return ModelSide(method, am, PromptFormatter(tokenizer, cfg.data.template, cfg.data.max_length),
                     tokenizer.pad_token_id)


def build_server(cfg, side: ModelSide) -> Server:
    fed = cfg.federation
    return Server(side.method, side.am.init_state, build_server_optimizer(fed), side.am.axes,
                  RobustOptions.from_config(fed),
                  keep_direction_scale=cfg.method_options.direction_scale == "keep",
                  transfer_dtype=transfer_dtype(fed.transfer_dtype), privacy=DPOptions.from_config(cfg))


def clients_per_round(cfg) -> int:
    return max(1, min(cfg.federation.clients, int(round(cfg.federation.fraction * cfg.federation.clients))))


def build_host(cfg, side: ModelSide, clients: Mapping[int, ClientData], store: PersonalStore | None = None,
               log: Callable[[str], None] = print) -> ClientHost:
    """The clients hosted in this process (id -> its rows): their encoded training rows and held-out rows,
    nobody else's.

    The centralized reference (`method.pooled`) is one client 0 that trains on every given client's rows, for
    as many steps as the round's sampled clients together.
    """
    encode = side.fmt.encode
    if side.method.pooled:
        train = {0: [encode(e) for c in clients.values() for e in c.train]}
        scale = clients_per_round(cfg)
    else:
        train = {c: [encode(e) for e in cd.train] for c, cd in clients.items()}
        scale = 1
    held_out = {c: eval_rows(cd, cfg.eval.split) for c, cd in clients.items()}
    return ClientHost(side.am, side.method, cfg, side.fmt, side.pad_id, train, held_out, store, log, scale)
