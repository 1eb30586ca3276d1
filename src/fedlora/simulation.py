"""The in-process runtime: ONE base model, every client hosted in this process, the round engine over plain calls.

A thin shell: `build` makes the pieces, `engine.RoundEngine` runs the rounds, `transport.InProcessTransport`
carries the requests as function calls, `personal.PersonalStore` holds the clients' personal components.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .build import build_host, build_model_side, build_server
from .core.components import State
from .data.federated import FederatedData
from .engine import RoundEngine, RoundRecord, sample_clients
from .evaluator import GlobalEvaluator
from .transport import InProcessTransport, Progress

__all__ = ["Simulation", "RoundRecord", "sample_clients"]


class Simulation:
    def __init__(self, cfg, tokenizer, base_model, data: FederatedData, log: Callable[[str], None] = print,
                 progress: Progress | None = None):
        self.cfg, self.data = cfg, data
        side = build_model_side(cfg, tokenizer, base_model)
        self.method, self.am, self.fmt = side.method, side.am, side.fmt
        n = len(data.clients)
        self.host = build_host(cfg, side, dict(enumerate(data.clients)), log=log)
        self.server = build_server(cfg, side)
        self.evaluator = GlobalEvaluator(self.am, self.fmt, data, cfg)
        self.transport = InProcessTransport(self.host, n, progress)
        self.engine = RoundEngine(cfg, self.method, self.server, self.evaluator, self.transport, self.am.init_state,
                                  log=log)

    # the pieces, by the names tests and benchmarks use
    @property
    def client(self):
        return self.host.client

    @property
    def train_rows(self):
        return self.host.train_rows

    @property
    def personal(self):
        """The clients' personal components (`personal.PersonalStore`)."""
        return self.host.store

    @property
    def history(self) -> list[RoundRecord]:
        return self.engine.history

    def parameter_counts(self) -> dict:
        return self.engine.parameter_counts()

    def run_round(self, rnd: int) -> RoundRecord:
        return self.engine.run_round(rnd)

    def run(self, on_round: Callable[[RoundRecord], None] | None = None, start_round: int = 1) -> list[RoundRecord]:
        return self.engine.run(on_round, start_round)

    def evaluate(self) -> dict:
        """The global model (the server's state) and every client's local model, now."""
        from .client_host import LocalTask

        task = LocalTask(evaluate=True, evaluate_global=self.engine.federated_eval)
        answers = self.host.local_round(0, {c: task for c in range(len(self.data.clients))},
                                        self.server.shared_state())
        return self.engine.evaluate(answers)

    def state_dict(self) -> dict:
        return self.engine.state_dict()

    def load_state_dict(self, state: Mapping, history: list[RoundRecord] | None = None) -> None:
        self.engine.load_state_dict(state, history or [])

    def local_state(self, cid: int) -> State:
        """Client `cid`'s local model: the server's global state with its personal components."""
        return self.host.local_state(cid, self.server.shared_state())
