"""Typed run configuration: YAML file + `--set key=value` overrides, validated field by field.

Every error names the field, the value and what is allowed, in one line. Unknown keys are
rejected with a "did you mean" suggestion. Overrides may use the full dotted path
(`federation.rounds=5`) or, when it is unique, the bare field name (`rounds=5`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

DEFAULT_DOLLY_PATH = "../shared/data/databricks-dolly-15k.jsonl"
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"


@dataclass
class ModelConfig:
    name: str = "smollm2"
    """`smollm2` (the embedded SmolLM2-135M-Instruct GGUF), a hub id, or a local directory."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    cache_dir: str | None = None
    """Where the converted embedded model is cached (default: $FEDLORA_CACHE or ~/.cache/fedlora)."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""


@dataclass
class DataConfig:
    source: Literal["dolly", "json", "natural_instructions"] = "dolly"
    path: str = DEFAULT_DOLLY_PATH
    """A local JSON/JSONL file (or NI task folder), or a hub dataset id."""
    field_map: dict[str, str] = field(
        default_factory=lambda: {
            "instruction": "instruction",
            "context": "context",
            "response": "response",
            "label": "category",
        }
    )
    max_rows: int | None = None
    """Seeded subsample of the whole dataset before partitioning (None: all rows)."""
    partition: Literal["iid", "dirichlet", "label", "shards", "task"] = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    labels_per_client: int = 1
    test_fraction: float = 0.1
    min_test_per_client: int = 2
    max_train_per_client: int | None = None
    global_test_per_label: int = 20
    template: Literal["auto", "plain", "chat"] = "auto"
    max_length: int = 256
    # Natural Instructions only
    tasks: list[str] | None = None
    max_instances_per_task: int | None = 500
    num_positive_examples: int = 0
    unseen_tasks: int = 4
    validation_fraction: float = 0.0
    """Fraction of each client's training rows held out as a validation split (for tuning)."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class FederationConfig:
    clients: int = 10
    fraction: float = 1.0
    """Fraction of clients sampled each round (at least one)."""
    rounds: int = 3
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam", "fedyogi"] = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    aggregation: Literal["mean", "median", "trimmed_mean"] = "mean"
    """How valid updates are combined: example-weighted `mean`, coordinate-wise `median` or `trimmed_mean`."""
    trim_fraction: float = 0.1
    """trimmed_mean: fraction of the clients dropped at each end, per coordinate (in [0, 0.5))."""
    clip_norm: float | None = None
    """Scale each client's update (change of the shared state) down to at most this L2 norm (None: off)."""
    max_norm_ratio: float | None = None
    """Reject updates whose norm exceeds this multiple of the round's median update norm, e.g. 10 (None: off)."""
    lockstep: bool = False
    """Train the round's sampled clients together, in one batched forward/backward over the shared base model
    (each example through its own client's adapter; per-client optimizer state). Same results as one after
    another up to float rounding (with lora.dropout 0); pays off on a GPU. See docs/performance.md (target 6)."""
    transfer_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the tensors that travel (down and up); the server aggregates in float32. 16-bit halves the bytes
    of every method; see docs/performance.md (communication)."""


@dataclass
class TrainConfig:
    local_steps: int = 5
    """Optimizer steps of the global (shared) phase per client per round (E_g)."""
    local_epochs: float | None = None
    """If set, replaces local_steps by this many passes over the client's training rows."""
    personal_steps: int = 5
    """Optimizer steps of the local (personal) phase per client per round (E_l)."""
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    personal_lr: float | None = None
    """Learning rate of the local phase (default: lr)."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    length_buckets: bool = False
    """Group each phase's drawn rows into micro-batches of similar length (less padding, faster; changes which
    rows share a step, so off by default). See docs/performance.md (target 7)."""


@dataclass
class MethodConfig:
    """Options of the method policies. Each method reads the ones that concern it."""

    norm_axis_a: Literal["rows", "cols"] = "rows"
    norm_axis_b: Literal["rows", "cols"] = "rows"
    personal_mode: Literal["persist", "reset", "offset"] = "persist"
    lr_mult: dict[str, float] = field(default_factory=dict)
    """Per-component learning-rate multipliers, e.g. {"A.mag": 10, "B.mag": 10}."""
    lr_match: bool = True
    """Default multipliers that make magnitude/direction factors learn as fast as plain LoRA factors
    (A.dir x sqrt(3), B.mag x sqrt(r)); see docs/methods.md."""
    freeze_a_mag: bool = False
    local_lr_mult: float = 10.0
    """fedlora_opt: learning-rate multiplier of the local phase (the local optimizer of the personal B.mag), on
    top of lr_match and lr_mult; the global phase is unchanged. 10 was best on the validation split (1: the
    plain reading); see docs/methods.md and docs/results.md."""
    local_train_b_dir: bool = False
    share_b_dir: bool = True
    """Upload and aggregate B's direction (default). false keeps it on the client next to B.mag, so only A
    travels: the literal reading "A carries the shared knowledge" (see docs/methods.md)."""
    share_b_mag: bool = False
    """Also keep a global B.mag (trained in the global phase and aggregated) besides the personal one."""
    b_mag_init: float = 0.0
    b_dir_init_norm: float = 1e-3
    """Stored norm of B's initial random direction rows (the forward pass normalizes them; a small value lets
    the first gradients set B's direction, like plain LoRA's zero-initialized B)."""
    direction_scale: Literal["unit", "keep"] = "keep"
    """After aggregation, direction rows get unit norm (`unit`) or the clients' mean stored norm (`keep`):
    the model is the same either way; `keep` preserves how fast the optimizer can turn a direction."""
    prox_mu: float = 0.01


@dataclass
class EvalConfig:
    every: int = 1
    """Evaluate every k rounds (and always after the last)."""
    max_examples_per_client: int = 16
    max_global_examples: int = 64
    generate: bool = True
    max_gen_examples: int = 8
    """Examples per client (and per global set) scored by ROUGE-L of greedy generations."""
    max_new_tokens: int = 32
    batch_size: int = 8
    split: Literal["test", "validation"] = "test"
    """`validation` evaluates on the validation rows carved from the clients' training data (for tuning;
    needs data.validation_fraction > 0): local = each client's own, global = all clients' pooled by label."""


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    overwrite: bool = False
    save_adapters: bool = True
    plots: bool = True
    checkpoint_every: int = 1
    """Checkpoint every k rounds (and always after the last; 0: only after the last). See docs/reliability.md."""


@dataclass
class Config:
    method: str = "fedlora_opt"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method_options: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing


class _DuplicateKey(Exception):
    def __init__(self, key, line: int):
        super().__init__(key)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep)


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Coerce/validate `value` against the annotation `tp`; raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(path, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_check_type(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {_check_type(path, k, args[0]): _check_type(f"{path}.{k}", v, args[1]) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_suggest(key, names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{path}.")
        else:
            kwargs[key] = _check_type(path, value, tp)
    return cls(**kwargs)


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaf_paths(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def resolve_key(key: str) -> str:
    """Map a `--set` key (dotted path or unique leaf name) to its full dotted path."""
    paths = _leaf_paths(Config)
    if key in paths:
        return key
    # dict-valued leaves accept sub-keys: method_options.lr_mult.A.mag=10
    for p in paths:
        if key.startswith(p + "."):
            return key
    matches = [p for p in paths if p.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"--set {key}: ambiguous, use one of {', '.join(matches)}")
    raise ConfigError(f"--set {key}: unknown config key{_suggest(key, paths + [p.split('.')[-1] for p in paths])}")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return resolve_key(key.strip()), value


def _apply(tree: dict, dotted: str, value: Any) -> None:
    """Set `section.field` (or `section.dictfield.key`, e.g. method_options.lr_mult.A.mag) in the raw tree."""
    parts = dotted.split(".")
    if len(parts) == 1:
        tree[parts[0]] = value
        return
    section = tree.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"{parts[0]}: expected a mapping, got {section!r}")
    if len(parts) == 2:
        section[parts[1]] = value
        return
    sub = section.setdefault(parts[1], {})
    if not isinstance(sub, dict):
        raise ConfigError(f"{parts[0]}.{parts[1]}: expected a mapping, got {sub!r}")
    sub[".".join(parts[2:])] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {e}") from None
        except _DuplicateKey as e:
            raise ConfigError(f"config file {p}: key '{e.key}' appears twice (line {e.line}); keep one") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {p} is not valid YAML{where}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
    for item in overrides or []:
        key, value = _parse_override(item)
        _apply(tree, key, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def _positive(path: str, value: float | int | None, *, allow_zero: bool = False, allow_none: bool = False) -> None:
    if value is None:
        if allow_none:
            return
        raise ConfigError(f"{path}: must be set")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}: {value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    from .core.methods import METHODS  # local import: methods import nothing from config

    if cfg.method not in METHODS:
        raise ConfigError(
            f"method: unknown method {cfg.method!r}{_suggest(cfg.method, list(METHODS))}; "
            f"available: {', '.join(METHODS)}"
        )
    try:
        METHODS[cfg.method](cfg.method_options)
    except ValueError as e:  # a policy that contradicts itself, e.g. personal_mode 'reset' of a personal-only part
        raise ConfigError(f"method_options: {e}") from None
    if cfg.seed < 0:
        raise ConfigError(f"seed: {cfg.seed!r} must be >= 0")
    _positive("model.threads", cfg.model.threads, allow_none=True)
    _positive("federation.clients", cfg.federation.clients)
    _positive("federation.rounds", cfg.federation.rounds)
    if not 0 < cfg.federation.fraction <= 1:
        raise ConfigError(f"federation.fraction: {cfg.federation.fraction!r} must be in (0, 1]")
    _positive("federation.server_lr", cfg.federation.server_lr)
    fed = cfg.federation
    for name in ("server_momentum", "server_beta1", "server_beta2"):
        if not 0 <= getattr(fed, name) < 1:
            raise ConfigError(f"federation.{name}: {getattr(fed, name)!r} must be in [0, 1)")
    _positive("federation.server_tau", fed.server_tau)
    if not 0 <= fed.trim_fraction < 0.5:
        raise ConfigError(f"federation.trim_fraction: {fed.trim_fraction!r} must be in [0, 0.5)")
    _positive("federation.clip_norm", fed.clip_norm, allow_none=True)
    if fed.max_norm_ratio is not None and not fed.max_norm_ratio > 1:
        raise ConfigError(f"federation.max_norm_ratio: {fed.max_norm_ratio!r} must be > 1 (or null: off)")
    _positive("train.local_steps", cfg.train.local_steps)
    _positive("train.local_epochs", cfg.train.local_epochs, allow_none=True)
    _positive("train.personal_steps", cfg.train.personal_steps, allow_zero=True)
    _positive("train.batch_size", cfg.train.batch_size)
    _positive("train.grad_accum", cfg.train.grad_accum)
    _positive("train.lr", cfg.train.lr)
    _positive("train.personal_lr", cfg.train.personal_lr, allow_none=True)
    _positive("train.warmup_steps", cfg.train.warmup_steps, allow_zero=True)
    _positive("train.weight_decay", cfg.train.weight_decay, allow_zero=True)
    _positive("train.max_grad_norm", cfg.train.max_grad_norm, allow_none=True)
    _positive("lora.r", cfg.lora.r)
    _positive("lora.alpha", cfg.lora.alpha)
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout: {cfg.lora.dropout!r} must be in [0, 1)")
    if not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules: must name at least one module")
    _positive("data.alpha", cfg.data.alpha)
    _positive("data.shards_per_client", cfg.data.shards_per_client)
    _positive("data.labels_per_client", cfg.data.labels_per_client)
    if not 0 < cfg.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction: {cfg.data.test_fraction!r} must be in (0, 1)")
    if not 0 <= cfg.data.validation_fraction < 1:
        raise ConfigError(f"data.validation_fraction: {cfg.data.validation_fraction!r} must be in [0, 1)")
    _positive("data.min_test_per_client", cfg.data.min_test_per_client)
    _positive("data.max_rows", cfg.data.max_rows, allow_none=True)
    _positive("data.max_train_per_client", cfg.data.max_train_per_client, allow_none=True)
    _positive("data.global_test_per_label", cfg.data.global_test_per_label, allow_zero=True)
    if cfg.data.max_length < 16:
        raise ConfigError(f"data.max_length: {cfg.data.max_length!r} must be >= 16")
    for key in ("instruction", "response"):
        if key not in cfg.data.field_map:
            raise ConfigError(f"data.field_map: missing the '{key}' entry")
    unknown = set(cfg.data.field_map) - {"instruction", "context", "response", "label"}
    if unknown:
        raise ConfigError(
            f"data.field_map: unknown entry '{sorted(unknown)[0]}'; allowed: instruction, context, response, label"
        )
    _positive("eval.every", cfg.eval.every)
    _positive("output.checkpoint_every", cfg.output.checkpoint_every, allow_zero=True)
    _positive("eval.max_examples_per_client", cfg.eval.max_examples_per_client)
    _positive("eval.max_global_examples", cfg.eval.max_global_examples)
    _positive("eval.max_gen_examples", cfg.eval.max_gen_examples, allow_zero=True)
    _positive("eval.max_new_tokens", cfg.eval.max_new_tokens)
    _positive("eval.batch_size", cfg.eval.batch_size)
    if cfg.eval.split == "validation" and cfg.data.validation_fraction <= 0:
        raise ConfigError("eval.split: 'validation' needs data.validation_fraction > 0")
    _positive("method_options.prox_mu", cfg.method_options.prox_mu, allow_zero=True)
    _positive("method_options.b_dir_init_norm", cfg.method_options.b_dir_init_norm)
    _positive("method_options.local_lr_mult", cfg.method_options.local_lr_mult)
    from .core.components import ALL_COMPONENTS

    for comp, mult in cfg.method_options.lr_mult.items():
        if comp not in ALL_COMPONENTS:
            raise ConfigError(
                f"method_options.lr_mult: unknown component {comp!r}{_suggest(comp, ALL_COMPONENTS)}; "
                f"known: {', '.join(ALL_COMPONENTS)}"
            )
        _positive(f"method_options.lr_mult.{comp}", mult)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
