"""Methods as declarative policies over named adapter components.

A `Method` says, for one round:
  * which adapter it uses (`lora`, `magdir` = magnitude/direction LoRA, `dora`, `dual` = two LoRAs),
  * the global phase: which components train (with learning-rate multipliers) before upload,
  * which components are shared (uploaded and aggregated) and which are personal (kept on the
    client; they override the global value in the client's local model),
  * the local phase: which personal components train after aggregation, starting from the new
    global adapter,
  * how a personal component evolves when it also has a global value (`persist`, `reset`, `offset`),
  * or, instead of a local phase, personal offsets trained jointly in the global phase (`joint_personal`),
  * extra loss terms (FedProx's proximal term).

Adding a method means adding a builder to `METHODS`; the training loop never looks at the name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from dataclasses import dataclass, field
from typing import Literal

from .components import NAMINGS

AdapterKind = Literal["lora", "magdir", "dora", "dual"]
PersonalMode = Literal["persist", "reset", "offset"]


@dataclass(frozen=True)
class ProximalTerm:
    """FedProx: (mu / 2) * ||theta - theta_global||^2 over the trained shared parameters."""

    mu: float


@dataclass(frozen=True)
class Method:
    name: str
    adapter: AdapterKind
    global_train: Mapping[str, float]
    """Components trained in the global phase -> learning-rate multiplier."""
    shared: frozenset[str]
    personal: frozenset[str] = frozenset()
    local_train: Mapping[str, float] = field(default_factory=dict)
    """Components trained in the local phase (all personal) -> learning-rate multiplier."""
    personal_mode: PersonalMode = "persist"
    joint_personal: Mapping[str, float] = field(default_factory=dict)
    """Components (shared, with a personal offset) whose offset trains IN the global phase, -> lr multiplier of
    the local optimizer. One pipeline: each step moves the global value with the global optimizer and the personal
    offset with the local one (`core.protocol.split_joint`)."""
    loss_terms: tuple[ProximalTerm, ...] = ()
    pooled: bool = False
    """Centralized reference: one trainer on the union of all clients' training data."""
    summary: str = ""

    def __post_init__(self) -> None:
        extra = set(self.local_train) - set(self.personal)
        if extra:
            raise ValueError(f"{self.name}: local phase trains non-personal components {sorted(extra)}")
        if self.personal_mode != "persist":
            not_global = set(self.personal) - set(self.shared)
            if not_global:
                raise ValueError(
                    f"{self.name}: personal_mode {self.personal_mode!r} needs a global value for "
                    f"{sorted(not_global)}; share it (method_options.share_b_mag / share_b_dir=true) or use 'persist'"
                )
        if self.joint_personal:
            if self.personal_mode != "offset":
                raise ValueError(f"{self.name}: the joint schedule trains a personal offset; it needs "
                                 f"personal_mode 'offset', not {self.personal_mode!r} (or set method_options.pipeline"
                                 "=sequential)")
            outside = set(self.joint_personal) - (set(self.personal) & set(self.shared))
            if outside:
                raise ValueError(f"{self.name}: the joint schedule needs {sorted(outside)} both shared and personal "
                                 "(e.g. method_options.share_b_mag=true), or method_options.pipeline=sequential")
            if self.local_train:
                raise ValueError(f"{self.name}: the joint schedule has no local phase")

    @property
    def has_local_phase(self) -> bool:
        return bool(self.local_train)

    @property
    def frozen(self) -> frozenset[str]:
        """Components that are neither trained nor personal: they stay at their (seeded, identical) init."""
        return frozenset(self.components) - set(self.global_train) - set(self.personal) - set(self.shared)

    @property
    def components(self) -> tuple[str, ...]:
        return ADAPTER_COMPONENTS[self.adapter]


ADAPTER_COMPONENTS: dict[str, tuple[str, ...]] = {kind: n.components for kind, n in NAMINGS.items()}
"""Each adapter kind's components (their names and parameter patterns: `core.components.NAMINGS`)."""


def _mult(opts, comps) -> dict[str, float]:
    return {c: float(opts.lr_mult.get(c, 1.0)) for c in comps}


# --------------------------------------------------------------------------- the methods


def lora_matched_multipliers(rank: int, b_free: bool = False) -> dict[str, float]:
    """Learning-rate multipliers that make the decomposed factors move as fast as plain LoRA's under Adam.

    Adam moves every entry by about lr per step. A LoRA row of B (r entries) then grows by up to
    lr*sqrt(r) per step, while B's magnitude (one number per row) grows by lr: x sqrt(r). PEFT's
    Kaiming-uniform init gives A's rows a norm of 1/sqrt(3), so a unit-norm stored direction turns
    sqrt(3) times slower than A itself: x sqrt(3). With a free B (`b_free`) B.dir is B itself and B.mag a
    relative gain: no multiplier. Explicit `lr_mult` entries override these.
    """
    return {"A.dir": math.sqrt(3.0)} if b_free else {"A.dir": math.sqrt(3.0), "B.mag": math.sqrt(rank)}


TUNED_LOCAL_LR_MULT = {"free": 7.0, "unit": 0.3}
"""`method_options.local_lr_mult` when unset, per B form: the fair study's tuning winners on validation (joint
pipeline; free: local lr 3e-2 at shared lr 4.2e-3; unit: 9e-4 at 3e-3; docs/results.md)."""


def fedlora_opt(opts, rank: int = 8) -> Method:
    """The paper's method: A's direction (and the rest of the adapter) shared; B's magnitude personal.

    `pipeline`: `sequential` runs the global phase (E_g steps), then the local phase of the personal B.mag (E_l
    steps) on the new global adapter. `joint` runs ONE phase of E_g + E_l steps in which the global optimizer
    moves the shared components and the local optimizer moves the personal B.mag offset, both from the same
    forward pass (B.mag = global + offset), so every step serves both the global and the personal model.
    """
    defaults = lora_matched_multipliers(rank, b_free=opts.b_direction == "free") if opts.lr_match else {}
    opts_mult = {**defaults, **opts.lr_mult}

    def _m(comps):
        return {c: float(opts_mult.get(c, 1.0)) for c in comps}

    global_comps = ["A.dir", "B.dir", "B.mag"] + ([] if opts.freeze_a_mag else ["A.mag"])
    shared = {"A.dir"} | ({"A.mag"} if not opts.freeze_a_mag else set())
    if opts.share_b_dir:
        shared.add("B.dir")
    if opts.share_b_mag:
        shared.add("B.mag")
    local = ["B.mag"] + (["B.dir"] if opts.local_train_b_dir else [])
    personal = set(local) | (set() if opts.share_b_dir else {"B.dir"})
    local_lr_mult = TUNED_LOCAL_LR_MULT[opts.b_direction] if opts.local_lr_mult is None else opts.local_lr_mult
    local_mults = {c: m * local_lr_mult for c, m in _m(local).items()}
    joint = opts.pipeline == "joint"
    return Method(
        name="fedlora_opt",
        adapter="magdir",
        global_train=_m(global_comps),
        shared=frozenset(shared),
        personal=frozenset(personal),
        local_train={} if joint else local_mults,
        joint_personal=local_mults if joint else {},
        personal_mode=opts.personal_mode,
        summary="magnitude/direction LoRA; the global optimizer trains the decomposed adapter and shares A (and "
        "B.dir); " + ("in the same steps, the local optimizer trains a personal B.mag offset" if joint else
                      "a local phase trains the personal B.mag") + ", which never leaves the client",
    )


def fedit(opts, rank: int = 8) -> Method:
    return Method("fedit", "lora", _mult(opts, ["A", "B"]), frozenset({"A", "B"}), summary="FedAvg over LoRA A and B")


def fedprox(opts, rank: int = 8) -> Method:
    return Method(
        "fedprox",
        "lora",
        _mult(opts, ["A", "B"]),
        frozenset({"A", "B"}),
        loss_terms=(ProximalTerm(opts.prox_mu),),
        summary="FedIT with the proximal term (mu/2)||theta - theta_g||^2",
    )


def ffa(opts, rank: int = 8) -> Method:
    return Method("ffa", "lora", _mult(opts, ["B"]), frozenset({"B"}), summary="FFA-LoRA: A frozen at init, B shared")


def fedsa(opts, rank: int = 8) -> Method:
    return Method(
        "fedsa",
        "lora",
        _mult(opts, ["A", "B"]),
        frozenset({"A"}),
        personal=frozenset({"B"}),
        summary="FedSA-LoRA: A shared, B stays on the client",
    )


def feddpa(opts, rank: int = 8) -> Method:
    return Method(
        "feddpa",
        "dual",
        _mult(opts, ["A", "B"]),
        frozenset({"A", "B"}),
        personal=frozenset({"L.A", "L.B"}),
        local_train=_mult(opts, ["L.A", "L.B"]),
        summary="FedDPA-F: a shared global LoRA, then a personal second LoRA fine-tuned on top of it",
    )


def feddora(opts, rank: int = 8) -> Method:
    return Method(
        "feddora",
        "dora",
        _mult(opts, ["A", "B", "W.mag"]),
        frozenset({"A", "B", "W.mag"}),
        summary="FedAvg over PEFT DoRA (A, B and the weight magnitude)",
    )


def fedit_ft(opts, rank: int = 8) -> Method:
    return Method(
        "fedit_ft",
        "lora",
        _mult(opts, ["A", "B"]),
        frozenset({"A", "B"}),
        personal=frozenset({"A", "B"}),
        local_train=_mult(opts, ["A", "B"]),
        personal_mode="reset",
        summary="FedIT, then each client fine-tunes a copy of the new global A, B for its local model",
    )


def local_only(opts, rank: int = 8) -> Method:
    return Method(
        "local_only",
        "lora",
        _mult(opts, ["A", "B"]),
        frozenset(),
        personal=frozenset({"A", "B"}),
        summary="no federation: every client trains its own A, B",
    )


def centralized(opts, rank: int = 8) -> Method:
    return Method(
        "centralized",
        "lora",
        _mult(opts, ["A", "B"]),
        frozenset({"A", "B"}),
        pooled=True,
        summary="one LoRA trained on the pooled training data of all clients (same total steps)",
    )


METHODS: dict[str, Callable[..., Method]] = {
    "fedlora_opt": fedlora_opt,
    "fedit": fedit,
    "fedprox": fedprox,
    "ffa": ffa,
    "fedsa": fedsa,
    "feddpa": feddpa,
    "feddora": feddora,
    "fedit_ft": fedit_ft,
    "local_only": local_only,
    "centralized": centralized,
}


def build_method(name: str, opts, rank: int = 8) -> Method:
    return METHODS[name](opts, rank)
