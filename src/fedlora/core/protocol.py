"""Which state a client trains, uploads and keeps in each phase of a round, for any `Method`.

Pure functions over state dicts. `global_state` always holds every component of the method's
adapter: shared ones as aggregated so far, the others at their seeded initial value (which every
client derives identically). A client's personal state holds its personal components: values, or
offsets from the global value in `offset` mode.
"""

from __future__ import annotations

from collections.abc import Mapping

from .components import State, component_of, join, select
from .methods import Method


def _personal_values(method: Method, global_state: Mapping, personal: Mapping | None) -> State:
    """The client's effective values of its personal components."""
    base = select(global_state, method.personal)
    if not personal:
        return dict(base)
    if method.personal_mode == "offset":
        return {k: base[k] + personal[k] for k in base}
    return join(base, personal)


def global_phase_state(method: Method, global_state: Mapping, personal: Mapping | None) -> State:
    """Starting point of the global phase: the global adapter; personal-only components from the client, and
    jointly trained ones at their effective value (global + the client's offset)."""
    own = select(_personal_values(method, global_state, personal),
                 (method.personal - method.shared) | set(method.joint_personal))
    return join(global_state, own)


def split_joint(trained: Mapping, global_state: Mapping, personal: Mapping | None,
                global_share: Mapping[str, float]) -> tuple[State, State]:
    """(trained state with the global values of the joint components, their new personal offsets).

    The joint schedule trains g + o (global value g, personal offset o) as ONE tensor, with lr_g + lr_o. Both
    parts get the same gradient every step, so two Adam optimizers would keep the same moments and move g by
    lr_g * u and o by lr_o * u: training the sum with lr_g + lr_o and splitting its change
    Δ = trained - (g + o) as g' = g + s * Δ, o' = o + (1 - s) * Δ with s = lr_g / (lr_g + lr_o) (`global_share`)
    is the same update (exactly, without weight decay).
    """
    trained, offsets = dict(trained), dict(personal or {})
    for k in select(trained, global_share):
        s, g, o = global_share[component_of(k)], global_state[k], offsets.get(k)
        delta = trained[k] - (g if o is None else g + o)
        offsets[k] = (1.0 - s) * delta if o is None else o + (1.0 - s) * delta
        trained[k] = g + s * delta
    return trained, offsets


def after_global_phase(method: Method, trained: Mapping, personal: Mapping | None) -> tuple[State, State]:
    """Split the trained state into (upload, new personal state)."""
    upload = select(trained, method.shared)
    new_personal = dict(personal or {})
    trained_personal_only = set(method.global_train) & (method.personal - method.shared)
    new_personal.update({k: v for k, v in select(trained, trained_personal_only).items()})
    return upload, new_personal


def local_phase_state(method: Method, global_state: Mapping, personal: Mapping | None) -> State:
    """Starting point of the local phase: the NEW global adapter with the client's personal components."""
    if method.personal_mode == "reset":
        return dict(global_state)
    return join(global_state, _personal_values(method, global_state, personal))


def after_local_phase(method: Method, trained: Mapping, global_state: Mapping) -> State:
    values = select(trained, method.personal)
    if method.personal_mode == "offset":
        return {k: v - global_state[k] for k, v in values.items()}
    return dict(values)


def local_model_state(method: Method, global_state: Mapping, personal: Mapping | None) -> State:
    """The client's personalized model: global adapter + its personal components."""
    return join(global_state, _personal_values(method, global_state, personal))
