"""The run configuration's typed sections; each checks its own fields (`validate`), `Config` the cross-section rules.

Every error is one line that names the field by its dotted path, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError
from .evaluation import EvalConfig, OutputConfig  # noqa: F401 (re-exported by the package)
from .section import _positive, _Section, _suggest  # noqa: F401 (_suggest: parser, runner)

DEFAULT_DOLLY_PATH = "../shared/data/databricks-dolly-15k.jsonl"
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"


@dataclass
class ModelConfig(_Section):
    SECTION = "model"

    name: str = "smollm2"
    """`smollm2` (the embedded SmolLM2-135M-Instruct GGUF), a hub id, or a local directory."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fast", "float32", "bfloat16"] = "auto"
    """`auto`: bfloat16 on CUDA, float32 on CPU; `fast`: bfloat16 wherever the hardware computes it natively
    (CUDA, CPUs with AVX512-BF16 or AMX), else float32 (the default job uses it)."""
    cache_dir: str | None = None
    """Where the converted embedded model is cached (default: $FEDLORA_CACHE or ~/.cache/fedlora)."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""

    def validate(self) -> None:
        self._positive("threads", allow_none=True)


@dataclass
class DataConfig(_Section):
    SECTION = "data"

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

    def validate(self) -> None:
        self._positive("alpha")
        self._positive("shards_per_client")
        self._positive("labels_per_client")
        self._within("test_fraction", 0, 1, "()")
        self._within("validation_fraction", 0, 1, "[)")
        self._positive("min_test_per_client")
        self._positive("max_rows", allow_none=True)
        self._positive("max_train_per_client", allow_none=True)
        self._positive("global_test_per_label", allow_zero=True)
        if self.max_length < 16:
            raise ConfigError(f"data.max_length: {self.max_length!r} must be >= 16")
        for key in ("instruction", "response"):
            if key not in self.field_map:
                raise ConfigError(f"data.field_map: missing the '{key}' entry")
        unknown = set(self.field_map) - {"instruction", "context", "response", "label"}
        if unknown:
            raise ConfigError(
                f"data.field_map: unknown entry '{sorted(unknown)[0]}'; allowed: instruction, context, response, label"
            )


@dataclass
class LoraConfig(_Section):
    SECTION = "lora"

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self) -> None:
        self._positive("r")
        self._positive("alpha")
        self._within("dropout", 0, 1, "[)")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: must name at least one module")


@dataclass
class FederationConfig(_Section):
    SECTION = "federation"

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

    def validate(self) -> None:
        self._positive("clients")
        self._positive("rounds")
        self._within("fraction", 0, 1, "(]")
        self._positive("server_lr")
        for name in ("server_momentum", "server_beta1", "server_beta2"):
            self._within(name, 0, 1, "[)")
        self._positive("server_tau")
        self._within("trim_fraction", 0, 0.5, "[)")
        self._positive("clip_norm", allow_none=True)
        if self.max_norm_ratio is not None and not self.max_norm_ratio > 1:
            raise ConfigError(f"federation.max_norm_ratio: {self.max_norm_ratio!r} must be > 1 (or null: off)")


@dataclass
class PrivacyConfig(_Section):
    """Client-level differential privacy of the shared components a client uploads (docs/privacy.md, core/dp.py)."""

    SECTION = "privacy"

    mode: Literal["off", "central", "local"] = "off"
    """`central`: the server clips each client's update to clipping_norm and adds N(0, (z·C/k)²) to their uniform
    mean (k = clients per round); `local`: each client clips its update and adds N(0, (z·C)²) before upload."""
    noise_multiplier: float = 1.0
    """z: the noise's std relative to the clipping norm (central: on the sum of the k clipped updates)."""
    clipping_norm: float | None = None
    """C: each client's update (its change of the shared state) is scaled down to at most this L2 norm; required."""
    delta: float = 1e-5
    """δ of the reported (ε, δ) guarantee, per client; must be below 1/federation.clients."""
    accounting: Literal["poisson", "fixed_size", "none"] = "poisson"
    """central: how client sampling amplifies privacy in the RDP accountant: `poisson` (rate q = k/n, the usual
    DP-FedAvg account; the engine samples exactly k, so an approximation), `fixed_size` (k of n without
    replacement, replace-one), `none`. local mode always uses none."""

    def validate(self) -> None:
        self._positive("noise_multiplier")
        self._positive("clipping_norm", allow_none=True)
        self._within("delta", 0, 1, "()")
        if self.mode != "off" and self.clipping_norm is None:
            raise ConfigError(f"privacy.clipping_norm: must be set when privacy.mode is '{self.mode}' "
                              f"(the L2 bound of each client's update)")


@dataclass
class TrainConfig(_Section):
    SECTION = "train"

    global_steps: int = 5
    """Optimizer steps of the global (shared) phase per client per round (E_g)."""
    local_epochs: float | None = None
    """If set, replaces global_steps by this many passes over the client's training rows."""
    personal_steps: int = 5
    """Optimizer steps of the local (personal) phase per client per round (E_l)."""
    equal_steps: bool = True
    """Equal compute: a method without a local phase (FedIT, FedProx, FFA, FedDoRA, ...) trains global_steps +
    personal_steps steps in its one phase, so every method spends the same optimizer steps per client-round.
    false: every method's global phase trains global_steps (an explicit, labelled deviation)."""
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

    def validate(self) -> None:
        self._positive("global_steps")
        self._positive("local_epochs", allow_none=True)
        self._positive("personal_steps", allow_zero=True)
        self._positive("batch_size")
        self._positive("grad_accum")
        self._positive("lr")
        self._positive("personal_lr", allow_none=True)
        self._positive("warmup_steps", allow_zero=True)
        self._positive("weight_decay", allow_zero=True)
        self._positive("max_grad_norm", allow_none=True)


@dataclass
class MethodConfig(_Section):
    """Options of the method policies. Each method reads the ones that concern it."""

    SECTION = "method_options"

    norm_axis_a: Literal["rows", "cols"] = "rows"
    norm_axis_b: Literal["rows", "cols"] = "rows"
    personal_mode: Literal["persist", "reset", "offset"] = "offset"
    """fedlora_opt: how a client's personal B.mag relates to the server's global B.mag. `offset` (default): a
    personal offset that persists across rounds, added to each round's new global B.mag; `reset`: the new global
    B.mag fine-tuned afresh each round; `persist`: a personal value kept from round to round (the only mode
    without a global B.mag, share_b_mag=false). See docs/methods.md."""
    pipeline: Literal["sequential", "joint"] = "joint"
    """fedlora_opt: how the global and the local optimizer share a round's steps. `joint` (default; needs
    personal_mode=offset and share_b_mag): one phase of E_g + E_l steps, each step moving the shared components
    with the global optimizer and the personal B.mag offset with the local one. `sequential` (method.md's
    reading): E_g global steps, then E_l local steps of the personal B.mag on the new global adapter. joint won
    the fair study's tuning on validation (docs/methods.md, docs/results.md)."""
    lr_mult: dict[str, float] = field(default_factory=dict)
    """Per-component learning-rate multipliers, e.g. {"A.mag": 10, "B.mag": 10}."""
    lr_match: bool = True
    """Default multipliers that make magnitude/direction factors learn as fast as plain LoRA factors
    (A.dir x sqrt(3), B.mag x sqrt(r)); see docs/methods.md."""
    freeze_a_mag: bool = False
    local_lr_mult: float | None = None
    """fedlora_opt: learning-rate multiplier of the local optimizer (of the personal B.mag), on top of
    train.personal_lr (default train.lr), lr_match and lr_mult; the global optimizer is unchanged. Default: the fair
    study's tuning winner on validation for the B form (`TUNED_LOCAL_LR_MULT`): 7 with b_direction=free (local lr
    3e-2 at shared lr 4.2e-3), 0.3 with b_direction=unit (pipeline=joint); see docs/methods.md, docs/results.md."""
    local_train_b_dir: bool = False
    share_b_dir: bool = True
    """Upload and aggregate B's direction (default). false keeps it on the client next to B.mag, so only A
    travels: the literal reading "A carries the shared knowledge" (see docs/methods.md)."""
    share_b_mag: bool = True
    """fedlora_opt: the server holds a global B.mag (trained in the global phase, aggregated) besides each client's
    personal one. false (with personal_mode=persist): no global B.mag; the global model then has B.mag at its
    initial value: 0 with b_direction=unit, i.e. the base model (ΔW = 0); 1 with free (the shared B as it is)."""
    b_mag_init: float = 0.0
    b_dir_init_norm: float = 1e-3
    """Stored norm of B's initial random direction rows (the forward pass normalizes them; a small value lets
    the first gradients set B's direction, like plain LoRA's zero-initialized B)."""
    b_direction: Literal["unit", "free"] = "free"
    """`free` (default): B = diag(B.mag)·B.dir with B.dir a plain LoRA factor (zero at init) and B.mag a gain of
    each row (1 at init), so the shared factors learn as plain LoRA's do and the personal B.mag offset rescales
    B's rows; b_mag_init and b_dir_init_norm then do not apply. `unit`: B = diag(B.mag)·B.dir/‖B.dir‖, the
    paper's decomposition read literally. free won the fair study's equal tuning on validation (docs/methods.md,
    "A free B"; docs/results.md)."""
    direction_scale: Literal["unit", "keep"] = "keep"
    """After aggregation, direction rows get unit norm (`unit`) or the clients' mean stored norm (`keep`):
    the model is the same either way; `keep` preserves how fast the optimizer can turn a direction."""
    prox_mu: float = 0.01

    def validate(self) -> None:
        from ..core.components import ALL_COMPONENTS  # local import: core imports nothing from config

        self._positive("prox_mu", allow_zero=True)
        self._positive("b_dir_init_norm")
        self._positive("local_lr_mult", allow_none=True)
        for comp, mult in self.lr_mult.items():
            if comp not in ALL_COMPONENTS:
                raise ConfigError(
                    f"method_options.lr_mult: unknown component {comp!r}{_suggest(comp, ALL_COMPONENTS)}; "
                    f"known: {', '.join(ALL_COMPONENTS)}"
                )
            _positive(f"method_options.lr_mult.{comp}", mult)


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
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sections(self) -> list[_Section]:
        return [getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), _Section)]

    def validate(self) -> None:
        """The top-level fields, every section's own checks, then the rules that span sections."""
        from ..core.methods import METHODS  # local import: methods import nothing from config

        if self.method not in METHODS:
            raise ConfigError(
                f"method: unknown method {self.method!r}{_suggest(self.method, list(METHODS))}; "
                f"available: {', '.join(METHODS)}"
            )
        try:
            method = METHODS[self.method](self.method_options)
        except ValueError as e:  # a policy that contradicts itself, e.g. personal_mode 'reset' of a personal-only part
            raise ConfigError(f"method_options: {e}") from None
        if self.seed < 0:
            raise ConfigError(f"seed: {self.seed!r} must be >= 0")
        for section in self.sections():
            section.validate()
        if self.eval.split == "validation" and self.data.validation_fraction <= 0:
            raise ConfigError("eval.split: 'validation' needs data.validation_fraction > 0")
        if self.privacy.mode != "off":
            self._check_privacy(method)

    def _check_privacy(self, method) -> None:
        p, fed = self.privacy, self.federation
        if method.pooled or not method.shared:
            raise ConfigError(f"privacy.mode: method '{self.method}' uploads no client updates to protect")
        if p.delta >= 1 / fed.clients:
            raise ConfigError(f"privacy.delta: {p.delta!r} must be below 1/federation.clients = {1 / fed.clients:g}")
        if p.mode == "central":  # the noise is calibrated to the uniform mean of clipped updates
            for name, off in (("aggregation", "mean"), ("clip_norm", None), ("max_norm_ratio", None)):
                if getattr(fed, name) != off:
                    raise ConfigError(f"federation.{name}: {getattr(fed, name)!r} cannot be used with privacy.mode "
                                      f"'central' (its noise is calibrated to a mean of updates clipped to "
                                      f"privacy.clipping_norm); use {off if off else 'null'} or privacy.mode local")


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express (`cfg.validate()`)."""
    cfg.validate()
