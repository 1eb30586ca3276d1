"""The client side of a round, for any method, over a shared AdapterModel. No transport here.

The in-process simulator and the Flower ClientApp both call these two phases; a client is
identified by its id, its encoded training rows and its personal state, all passed in.
With `privacy.mode: local` the upload is privatized here, before it leaves the client (`core.dp`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .adapters import AdapterModel
from .core import dp, protocol
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
    def __init__(self, am: AdapterModel, method: Method, cfg, pad_id: int, log=print):
        self.am, self.method, self.cfg, self.pad_id, self.log = am, method, cfg, pad_id, log
        self._lockstep_warned: set[str] = set()
        opts = dp.DPOptions.from_config(cfg)
        self.local_dp = opts if opts is not None and opts.mode == "local" else None
        """Local DP: clip and noise each upload's delta (`core.dp.privatize_upload`); None: off."""

    def full_global_state(self, shared: Mapping) -> State:
        """The server sends only shared components; the rest are the seeded init every client shares."""
        return join(self.am.init_state, shared)

    def steps_for(self, num_rows: int, scale: int = 1) -> int:
        """Steps of the global phase: E_g, or E_g + E_l for a method with no local phase (`train.equal_steps`)."""
        t = self.cfg.train
        if t.local_epochs is not None:
            steps = max(1, math.ceil(t.local_epochs * num_rows / (t.batch_size * t.grad_accum)))
        else:
            steps = t.global_steps
        if t.equal_steps and not self.method.has_local_phase:
            steps += t.personal_steps
        return steps * scale

    def _seed(self, cid: int, rnd: int, phase: int) -> tuple[int, int, int, int]:
        return (self.cfg.seed, cid, rnd, phase)

    def global_phase(self, cid: int, rnd: int, shared: Mapping, personal: Mapping | None,
                     rows: Sequence[Encoded], steps: int | None = None) -> GlobalPhaseResult:
        return self.global_phases([(cid, rnd, shared, personal, rows, steps)], lockstep=False)[0]

    def global_phases(self, jobs: Sequence[tuple], lockstep: bool | None = None) -> list[GlobalPhaseResult]:
        """The global phase of several clients: jobs of (cid, rnd, shared, personal, rows, steps).

        One after another, or all at once in one batched forward/backward (`federation.lockstep`, see
        fedlora.lockstep) where the method and the phases allow it; the results are the same either way
        (up to float rounding, and with lora.dropout 0).
        """
        t, m = self.cfg.train, self.method
        starts, batches, anchors, keys = [], [], [], []
        for cid, rnd, shared, personal, rows, steps in jobs:
            start = protocol.global_phase_state(m, self.full_global_state(shared), personal)
            key = self._seed(cid, rnd, GLOBAL_PHASE)
            starts.append(start)
            keys.append(key)
            batches.append(sample_batches(rows, steps or self.steps_for(len(rows)), t.batch_size, t.grad_accum,
                                          phase_rng(*key), by_length=t.length_buckets))
            anchors.append({k: v for k, v in start.items() if k in shared} if m.loss_terms else None)
        trainable, global_share = self.joint_multipliers()
        trained = self._train(starts, batches, trainable, t.lr, keys, lockstep, m.loss_terms, anchors)
        out = []
        for (cid, rnd, shared, personal, _, _), (state, stats) in zip(jobs, trained):
            if global_share and not stats.diverged:  # joint: the global value's part of the change, the offset's
                state, personal = protocol.split_joint(state, self.full_global_state(shared), personal,
                                                       global_share)
            upload, new_personal = protocol.after_global_phase(m, state, personal)
            if stats.diverged:  # a NaN loss stops this client's update, not the run
                upload, new_personal = {}, dict(personal or {})
            elif self.local_dp is not None and upload:  # noise seeded by (seed, round, client): reproducible
                gen = dp.noise_generator(self.cfg.seed, rnd, cid, 0xD1)
                upload, _ = dp.privatize_upload(upload, shared, self.am.axes, self.local_dp, gen)
            upload = cast_floats(upload, transfer_dtype(self.cfg.federation.transfer_dtype))  # what travels
            update = ClientUpdate(cid, upload, stats.examples,
                                  {"train_loss": stats.loss, "steps": stats.steps, "tokens": stats.tokens,
                                   "diverged": stats.diverged})
            out.append(GlobalPhaseResult(update, new_personal, stats))
        return out

    def joint_multipliers(self) -> tuple[dict[str, float], dict[str, float]]:
        """(lr multipliers of the global phase, relative to train.lr; each joint component's global share).

        A jointly trained component moves with lr_g + lr_o: its global multiplier plus its local one scaled by
        train.personal_lr / train.lr (the local optimizer's learning rate).
        """
        m, t = self.method, self.cfg.train
        mults = dict(m.global_train)
        share = {}
        for c, local in m.joint_personal.items():
            g = m.global_train.get(c, 0.0)
            o = local * (t.personal_lr or t.lr) / t.lr
            mults[c] = g + o
            share[c] = g / (g + o)
        return mults, share

    def local_phase(self, cid: int, rnd: int, shared: Mapping, personal: Mapping | None,
                    rows: Sequence[Encoded]) -> tuple[State, PhaseStats]:
        return self.local_phases([(cid, rnd, shared, personal, rows)], lockstep=False)[0]

    def local_phases(self, jobs: Sequence[tuple], lockstep: bool | None = None) -> list[tuple[State, PhaseStats]]:
        """The local phase of several clients: jobs of (cid, rnd, shared, personal, rows); see global_phases."""
        t, m = self.cfg.train, self.method
        if not m.has_local_phase or t.personal_steps == 0:
            return [(dict(personal or {}), PhaseStats()) for _, _, _, personal, _ in jobs]
        starts, batches, keys, globals_ = [], [], [], []
        for cid, rnd, shared, personal, rows in jobs:
            g = self.full_global_state(shared)
            key = self._seed(cid, rnd, LOCAL_PHASE)
            globals_.append(g)
            starts.append(protocol.local_phase_state(m, g, personal))
            keys.append(key)
            batches.append(sample_batches(rows, t.personal_steps, t.batch_size, t.grad_accum, phase_rng(*key),
                                          by_length=t.length_buckets))
        trained = self._train(starts, batches, m.local_train, t.personal_lr or t.lr, keys, lockstep)
        return [((dict(personal or {}), stats) if stats.diverged else (protocol.after_local_phase(m, state, g), stats))
                for (_, _, _, personal, _), g, (state, stats) in zip(jobs, globals_, trained)]

    def _train(self, starts, batches, trainable, lr, keys, lockstep, loss_terms=(), anchors=None):
        """[(trained state, stats)] per client: in lockstep when asked for and possible, else one by one."""
        from .lockstep import reason_unsupported, train_lockstep

        t = self.cfg.train
        if lockstep is None:
            lockstep = self.cfg.federation.lockstep
        if lockstep and len(starts) > 1:
            why = reason_unsupported(self.am, batches, bool(loss_terms))
            if why is None:
                states, stats = train_lockstep(self.am, starts, batches, trainable, lr=lr, train_cfg=t,
                                               pad_id=self.pad_id, torch_seed=hash(keys[0]) & 0x7FFFFFFF)
                return list(zip(states, stats))
            if why not in self._lockstep_warned:
                self._lockstep_warned.add(why)
                self.log(f"federation.lockstep: training one client after another ({why})")
        out = []
        for start, b, key, anchor in zip(starts, batches, keys, anchors or [None] * len(starts)):
            self.am.load_state(start)
            stats = train_phase(self.am, b, trainable, lr=lr, train_cfg=t, pad_id=self.pad_id,
                                loss_terms=loss_terms, anchor=anchor, torch_seed=hash(key) & 0x7FFFFFFF)
            out.append((self.am.state(), stats))
        return out

    @staticmethod
    def upload_bytes(update: ClientUpdate) -> int:
        return nbytes(update.state)
