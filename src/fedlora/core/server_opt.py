"""Server optimizers applied to the aggregated update (Reddi et al., "Adaptive Federated Optimization").

Each takes the current global state and the pseudo-gradient `delta = aggregate - global` and
returns the new global state. FedAvg with lr 1 returns the aggregate itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .components import State


@dataclass
class FedAvg:
    lr: float = 1.0

    def step(self, current: State, delta: State) -> State:
        return {k: current[k] + self.lr * delta[k] for k in delta}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class FedAvgM:
    lr: float = 1.0
    momentum: float = 0.9
    velocity: State = field(default_factory=dict)

    def step(self, current: State, delta: State) -> State:
        out = {}
        for k, d in delta.items():
            v = self.velocity.get(k)
            v = d.clone() if v is None else self.momentum * v + d
            self.velocity[k] = v
            out[k] = current[k] + self.lr * v
        return out

    def state_dict(self) -> dict:
        return {"velocity": self.velocity}

    def load_state_dict(self, state: dict) -> None:
        self.velocity = dict(state["velocity"])


@dataclass
class _Adaptive:
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: State = field(default_factory=dict)
    v: State = field(default_factory=dict)

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, current: State, delta: State) -> State:
        out = {}
        for k, d in delta.items():
            m = self.m.get(k, torch.zeros_like(d))
            v = self.v.get(k, torch.full_like(d, self.tau**2))
            m = self.beta1 * m + (1 - self.beta1) * d
            v = self._second_moment(v, d * d)
            self.m[k], self.v[k] = m, v
            out[k] = current[k] + self.lr * m / (v.sqrt() + self.tau)
        return out

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v = dict(state["m"]), dict(state["v"])


class FedAdam(_Adaptive):
    def _second_moment(self, v, d2):
        return self.beta2 * v + (1 - self.beta2) * d2


class FedYogi(_Adaptive):
    def _second_moment(self, v, d2):
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)


def build_server_optimizer(fed_cfg):
    name = fed_cfg.server_optimizer
    if name == "fedavg":
        return FedAvg(lr=fed_cfg.server_lr)
    if name == "fedavgm":
        return FedAvgM(lr=fed_cfg.server_lr, momentum=fed_cfg.server_momentum)
    cls = FedAdam if name == "fedadam" else FedYogi
    return cls(lr=fed_cfg.server_lr, beta1=fed_cfg.server_beta1, beta2=fed_cfg.server_beta2, tau=fed_cfg.server_tau)
