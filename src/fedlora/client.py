"""The client side of a round, for any method, over a shared AdapterModel. No transport here.

The in-process simulator and the Flower ClientApp both call these two phases; a client is
identified by its id, its encoded training rows and its personal state, all passed in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .adapters import AdapterModel
from .core import protocol
from .core.aggregate import ClientUpdate
from .core.components import State, cast_floats, join, nbytes, transfer_dtype
from .core.methods import Method
from .data.prompts import Encoded
from .training import PhaseStats, phase_rng, sample_batches, train_phase

GLOBAL_PHASE, LOCAL_PHASE = 1, 2


@dataclass
class GlobalPhaseResult:
    update: ClientUpdate
    personal: State
    stats: PhaseStats


class FedClient:
    def __init__(self, am: AdapterModel, method: Method, cfg, pad_id: int):
        self.am, self.method, self.cfg, self.pad_id = am, method, cfg, pad_id

    def full_global_state(self, shared: Mapping) -> State:
        """The server sends only shared components; the rest are the seeded init every client shares."""
        return join(self.am.init_state, shared)

    def steps_for(self, num_rows: int, scale: int = 1) -> int:
        t = self.cfg.train
        if t.local_epochs is not None:
            return max(1, math.ceil(t.local_epochs * num_rows / (t.batch_size * t.grad_accum))) * scale
        return t.local_steps * scale

    def _seed(self, cid: int, rnd: int, phase: int) -> tuple[int, int, int, int]:
        return (self.cfg.seed, cid, rnd, phase)

    def global_phase(self, cid: int, rnd: int, shared: Mapping, personal: Mapping | None,
                     rows: Sequence[Encoded], steps: int | None = None) -> GlobalPhaseResult:
        t, m = self.cfg.train, self.method
        g = self.full_global_state(shared)
        start = protocol.global_phase_state(m, g, personal)
        self.am.load_state(start)
        key = self._seed(cid, rnd, GLOBAL_PHASE)
        batches = sample_batches(rows, steps or self.steps_for(len(rows)), t.batch_size, t.grad_accum, phase_rng(*key),
                                 by_length=t.length_buckets)
        anchor = {k: v for k, v in start.items() if k in shared} if m.loss_terms else None
        stats = train_phase(self.am, batches, m.global_train, lr=t.lr, train_cfg=t, pad_id=self.pad_id,
                            loss_terms=m.loss_terms, anchor=anchor, torch_seed=hash(key) & 0x7FFFFFFF)
        trained = self.am.state()
        upload, new_personal = protocol.after_global_phase(m, trained, personal)
        if stats.diverged:  # a NaN loss stops this client's update, not the run
            upload, new_personal = {}, dict(personal or {})
        upload = cast_floats(upload, transfer_dtype(self.cfg.federation.transfer_dtype))  # what travels
        update = ClientUpdate(cid, upload, stats.examples,
                              {"train_loss": stats.loss, "steps": stats.steps, "diverged": stats.diverged})
        return GlobalPhaseResult(update, new_personal, stats)

    def local_phase(self, cid: int, rnd: int, shared: Mapping, personal: Mapping | None,
                    rows: Sequence[Encoded]) -> tuple[State, PhaseStats]:
        t, m = self.cfg.train, self.method
        if not m.has_local_phase or t.personal_steps == 0:
            return dict(personal or {}), PhaseStats()
        g = self.full_global_state(shared)
        self.am.load_state(protocol.local_phase_state(m, g, personal))
        key = self._seed(cid, rnd, LOCAL_PHASE)
        batches = sample_batches(rows, t.personal_steps, t.batch_size, t.grad_accum, phase_rng(*key),
                                 by_length=t.length_buckets)
        stats = train_phase(self.am, batches, m.local_train, lr=t.personal_lr or t.lr, train_cfg=t,
                            pad_id=self.pad_id, torch_seed=hash(key) & 0x7FFFFFFF)
        if stats.diverged:
            return dict(personal or {}), stats
        return protocol.after_local_phase(m, self.am.state(), g), stats

    @staticmethod
    def upload_bytes(update: ClientUpdate) -> int:
        return nbytes(update.state)
