"""What the Flower runtime reads besides the project's config: the run config (server) and the node config (client).

Run config (`[tool.flwr.app.config]` in pyproject.toml, `flwr run --run-config "key=value ..."`):

  config             the project's YAML config ("" = built-in defaults), relative to the ServerApp's working directory
  set                overrides in `fedlora run --set` syntax, space separated: "rounds=2 clients=3"
  out                run directory ("" = output.dir of the config)
  overwrite          replace an existing run directory
  resume             continue the run directory `out` from its last server checkpoint (written every
                     output.checkpoint_every rounds); the config must be the run's (see docs/reliability.md)
  force              with resume: continue even if the config or the data differ from the run's
  min-replies        fewest global-phase replies with which a round still aggregates (fewer: the global model
                     stays as it is for that round; the run goes on)
  round-timeout      seconds to wait for the replies of one phase; clients that have not answered by then
                     count as failed for that round
  min-nodes          client nodes to wait for before round 1 (0 = all `federation.clients`)
  node-wait-timeout  seconds to wait for them

Run config, for clients with their own data:

  client-data        "partition" (default): every node reads the same dataset and is partition `partition-id`
                     of it (research runs; the simulator's numbers); "own": every node brings its own data
                     (node config data-path, no partition-id), the server reads none
  global-test        with client-data=own: an optional JSON/JSONL file of test rows on the server (the config's
                     field map), on which the server also evaluates the global model

Node config (`flower-supernode --node-config "key=value ..."`):

  partition-id       which client of the config this node is (0 .. federation.clients-1), when every node reads
                     the same dataset (run config client-data=partition)
  num-partitions     if given, must equal federation.clients
  data-path          this machine's data: with partition-id, its copy of the shared dataset (data.path); without,
                     this client's own data (JSON/JSONL with the config's field map, or a Natural Instructions
                     task folder): it carves its own test split and trains on the rest
  client-name        own data: this client's stable name (default: derived from the host name and data-path); the
                     server gives each name a client id for the whole run
  model              this machine's model directory or hub id (model.name)
  model-cache-dir    model.cache_dir on this machine
  device, threads    model.device / model.threads on this machine
  state-dir          where the node keeps its personal state, durable across restarts (default: environment
                     variable FEDLORA_NODE_STATE_DIR, else ~/.fedlora/node-state)
  export-dir         where this node writes its personalized adapter after the last round
"""

from __future__ import annotations

import difflib
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, config_from_dict, load_config
from ..errors import ConfigError


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class RunSettings:
    config: str = ""
    set: str = ""
    out: str = ""
    overwrite: bool = False
    resume: bool = False
    force: bool = False
    min_replies: int = 1
    round_timeout: float = 600.0
    min_nodes: int = 0
    node_wait_timeout: float = 600.0
    client_data: str = "partition"
    global_test: str = ""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        kwargs = {}
        for key, value in run_config.items():
            f = known.get(key)
            if f is None:
                raise ConfigError(f"run config: unknown key '{key}'{_suggest(key, list(known))}; "
                                  f"known: {', '.join(known)}")
            kwargs[f.name] = _coerce(f"run config '{key}'", value, type(getattr(cls(), f.name)))
        s = cls(**kwargs)
        if s.resume and s.overwrite:
            raise ConfigError("run config: 'resume' and 'overwrite' contradict each other; use one or the other")
        if s.force and not s.resume:
            raise ConfigError("run config 'force' only applies with 'resume=true'")
        if s.min_replies < 1:
            raise ConfigError(f"run config 'min-replies': {s.min_replies} must be >= 1")
        if s.min_nodes < 0:
            raise ConfigError(f"run config 'min-nodes': {s.min_nodes} must be >= 0")
        if s.client_data not in ("partition", "own"):
            raise ConfigError(f"run config 'client-data': {s.client_data!r} must be 'partition' (every node reads "
                              f"the same dataset) or 'own' (every node brings its own data)")
        if s.global_test and s.client_data != "own":
            raise ConfigError("run config 'global-test' only applies with client-data=own (with a shared dataset "
                              "the server holds its global test set already)")
        for name in ("round_timeout", "node_wait_timeout"):
            if getattr(s, name) <= 0:
                raise ConfigError(f"run config '{name.replace('_', '-')}': {getattr(s, name)} must be > 0")
        return s

    def as_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def overrides(self) -> list[str]:
        try:
            return shlex.split(self.set)
        except ValueError as e:
            raise ConfigError(f"run config 'set': cannot split {self.set!r} into KEY=VALUE items ({e})") from None

    def load(self) -> Config:
        """The project's config: the YAML file (if any) plus the `set` overrides, validated."""
        cfg = load_config(self.config or None, self.overrides())
        if self.out:
            cfg.output.dir = self.out
        if self.overwrite:
            cfg.output.overwrite = True
        return cfg


def _coerce(where: str, value: Any, tp: type) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")


# ----------------------------------------------------------------------------- node config

# node-config key -> (config path, type)
NODE_OVERRIDES: dict[str, tuple[str, type]] = {
    "data-path": ("data.path", str),
    "model": ("model.name", str),
    "model-cache-dir": ("model.cache_dir", str),
    "device": ("model.device", str),
    "threads": ("model.threads", int),
}
NODE_KEYS = ("partition-id", "num-partitions", "client-name", "state-dir", "export-dir", *NODE_OVERRIDES)
DEFAULT_STATE_DIR = "~/.fedlora/node-state"


@dataclass
class NodeSettings:
    partition_id: int | None
    """None: a client with its own data (`data-path`)."""
    num_partitions: int | None
    export_dir: Path | None
    overrides: dict[str, Any]
    state_dir: Path = Path(DEFAULT_STATE_DIR).expanduser()
    client_name: str | None = None

    @property
    def own_data(self) -> bool:
        return self.partition_id is None

    @property
    def key(self) -> str:
        """This client's stable name in the run: its partition, or its own (client-name, else host + data-path)."""
        if self.partition_id is not None:
            return f"partition-{self.partition_id}"
        if self.client_name:
            return self.client_name
        import hashlib
        import socket

        where = f"{socket.gethostname()}:{Path(self.overrides['data.path']).expanduser().resolve()}"
        return "data-" + hashlib.sha256(where.encode()).hexdigest()[:12]

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        for key in node_config:
            if key not in NODE_KEYS:
                raise ConfigError(f"node config: unknown key '{key}'{_suggest(key, list(NODE_KEYS))}; "
                                  f"known: {', '.join(NODE_KEYS)}")
        if "partition-id" not in node_config and "data-path" not in node_config:
            raise ConfigError("node config: give 'partition-id' (every node reads the same dataset: "
                              "--node-config \"partition-id=<0..N-1> num-partitions=<N>\") or 'data-path' (this "
                              "client's own data: --node-config \"data-path=/path/to/rows.jsonl\")")
        pid = node_config.get("partition-id")
        pid = None if pid is None else _coerce("node config 'partition-id'", pid, int)
        n = node_config.get("num-partitions")
        n = None if n is None else _coerce("node config 'num-partitions'", n, int)
        if pid is None and n is not None:
            raise ConfigError("node config 'num-partitions' needs 'partition-id' (a client with its own data "
                              "is no partition)")
        name = node_config.get("client-name")
        name = _coerce("node config 'client-name'", name, str) if name is not None else None
        if name is not None and pid is not None:
            raise ConfigError("node config 'client-name' is for a client with its own data; with 'partition-id' "
                              "the partition names the client")
        export = node_config.get("export-dir")
        export = Path(_coerce("node config 'export-dir'", export, str)).expanduser() if export else None
        default_state = os.environ.get("FEDLORA_NODE_STATE_DIR") or DEFAULT_STATE_DIR
        state = Path(_coerce("node config 'state-dir'", node_config.get("state-dir", default_state),
                             str)).expanduser()
        overrides = {path: _coerce(f"node config '{key}'", node_config[key], tp)
                     for key, (path, tp) in NODE_OVERRIDES.items() if key in node_config}
        return cls(pid, n, export, overrides, state, name)

    def config(self, cfg_yaml: str) -> Config:
        """The server's config with this machine's local settings (paths, device, threads) put in."""
        tree = yaml.safe_load(cfg_yaml)
        for dotted, value in self.overrides.items():
            section, name = dotted.split(".")
            tree.setdefault(section, {})[name] = value
        cfg = config_from_dict(tree)
        if self.partition_id is None:
            return cfg
        n = cfg.federation.clients
        if not 0 <= self.partition_id < n:
            raise ConfigError(f"node config 'partition-id': {self.partition_id} is out of range; the run has "
                              f"federation.clients={n} (ids 0..{n - 1})")
        if self.num_partitions is not None and self.num_partitions != n:
            raise ConfigError(f"node config 'num-partitions': {self.num_partitions}, but the run has "
                              f"federation.clients={n}; they must be equal")
        return cfg
