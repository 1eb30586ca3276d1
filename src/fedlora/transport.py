"""How the round engine reaches the clients: the small interface every runtime implements.

A round is ONE exchange (see `engine.RoundEngine.step`): `exchange(req)` carries the server's shared
state S to the clients named in `req`; each first finishes the open round on S (its local phase, the
evaluation of its local model and, with federated evaluation, of the global model S: `req.tasks`), then
runs the global phase of the next round from S (`req.train`) and replies once: metrics, plus the
trained shared components if it trained (nothing personal, ever). The last round is finished by a
closing exchange with no global phase.

It returns (answers by client id: the `ClientHost.local_round` metrics, updates by client id, {client id:
why it failed}). `InProcessTransport` calls a `ClientHost` directly; `flower.transport.FlowerTransport`
sends one Flower message per client to nodes whose ClientApp calls the same `ClientHost`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .checkpoint import fault_point
from .client_host import ClientHost, LocalTask
from .core.aggregate import ClientUpdate
from .core.components import State


@dataclass
class Exchange:
    """One exchange of a round: what each client is asked (see `transport.Transport.exchange`)."""

    shared: State
    """The server's shared state: the local tasks run on it, the global phases start from it."""
    task_round: int
    tasks: dict[int, LocalTask]
    """The open round's second half, per client: its local phase and/or evaluations (done first)."""
    train_round: int
    train: list[int]
    """Clients that run `train_round`'s global phase and upload their shared components."""


Failed = dict[int, str]
Progress = Callable[[int, int, str, object, float], None]
"""progress(round, client id, "global" | "local", the phase's `training.PhaseStats`, seconds it took)."""


class Transport(Protocol):
    runtime: str
    """Name of the runtime, saved in checkpoints (a checkpoint resumes only on its own runtime)."""

    def prepare(self, rnd: int) -> None:
        """Before a round: learn which clients are reachable (nodes that left or joined)."""

    def exchange(self, req: Exchange) -> tuple[dict[int, dict], dict[int, ClientUpdate], Failed]:
        ...

    def reachable(self) -> list[int]:
        """Clients that can be asked now."""

    def round_info(self, sampled: Sequence[int]) -> dict:
        """Extra, runtime-specific fields of the round's metrics row."""

    def state_dict(self) -> dict:
        """What this runtime itself must checkpoint (the in-process clients' personal state)."""

    def load_state_dict(self, state: Mapping) -> None:
        ...

    def export_local(self, adapters_dir: Path, shared: Mapping) -> None:
        """Write the clients' local adapters, where the clients' personal state is at hand."""


class InProcessTransport:
    """Every client in this process: the requests are plain calls on one `ClientHost`."""

    runtime = "in-process"

    def __init__(self, host: ClientHost, num_clients: int, progress: Progress | None = None):
        self.host, self.n, self.progress = host, num_clients, progress

    def prepare(self, rnd: int) -> None:
        return None

    def reachable(self) -> list[int]:
        return list(range(self.n))

    def round_info(self, sampled: Sequence[int]) -> dict:
        return {}

    def _reporter(self, rnd: int, phase: str):
        """on_done(cid, stats) for one phase of a round: `progress` with the seconds since the last report."""
        last = [time.perf_counter()]

        def done(cid: int, stats) -> None:
            now = time.perf_counter()
            if self.progress is not None:
                self.progress(rnd, cid, phase, stats, now - last[0])
            last[0] = now

        return done

    def exchange(self, req):
        """Every client's open-round tasks, then the next round's global phases (the order a node keeps)."""
        answers = {}
        if req.tasks:
            answers = self.host.local_round(req.task_round, req.tasks, req.shared,
                                            on_done=self._reporter(req.task_round, "local"))
        updates = {}
        if req.train:
            report = self._reporter(req.train_round, "global")

            def done(cid: int, stats) -> None:
                report(cid, stats)
                fault_point("train", req.train_round)

            updates = self.host.global_phases(req.train_round, req.train, req.shared, on_done=done)
        return answers, updates, {}

    def state_dict(self) -> dict:
        return {"personal": self.host.store.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.host.store.load_state_dict(state["personal"], self.host.am.init_state, self.n)

    def export_local(self, adapters_dir: Path, shared: Mapping) -> None:
        import torch

        store = self.host.store
        if not self.host.method.personal:
            return
        for cid in store.clients():
            self.host.am.export_peft(self.host.local_state(cid, shared), adapters_dir / "clients" / f"client_{cid}")
        torch.save(store.state_dict(), adapters_dir.parent / "personal_state.pt")
