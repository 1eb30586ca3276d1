"""Where clients' personal components live, and the only code that reads or writes them.

A personal component (fedlora_opt's `B.mag`, FedSA-LoRA's `B`, FedDPA's second LoRA, ...) is trained
on its client and never leaves it: no message, no server state, no global model holds it. One
`PersonalStore` holds the personal state of the clients hosted in one process:

  * the in-process simulator: every client's, in one `PersonalStore` (checkpointed with the run);
  * a Flower node: its own client's, durable in the node's state directory (`DiskPersonalStore`).

What a personal state *means* relative to the global value (a value, or an offset in `offset`
mode) is the method's business: see `core.protocol`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .core.components import State, clone


class PersonalStore:
    """{client id: personal state}, kept in memory."""

    def __init__(self) -> None:
        self._states: dict[int, State] = {}

    def get(self, cid: int) -> State | None:
        """The client's personal state, or None before its first phase (protocol uses the initial value)."""
        return self._states.get(int(cid))

    def put(self, cid: int, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            self._states[int(cid)] = dict(state)

    def at(self, rnd: int, phase: str) -> None:
        """The phase about to run (a durable store keeps a copy per phase; in memory, only the newest)."""

    def clients(self) -> list[int]:
        return sorted(self._states)

    def __iter__(self) -> Iterator[int]:
        return iter(self.clients())

    def __len__(self) -> int:
        return len(self.clients())

    def __contains__(self, cid) -> bool:
        return self.get(cid) is not None

    def __getitem__(self, cid: int) -> State:
        state = self.get(cid)
        if state is None:
            raise KeyError(f"client {cid} has no personal state yet")
        return state

    def __setitem__(self, cid: int, state: Mapping[str, torch.Tensor]) -> None:
        self.put(cid, state)

    def items(self):
        return [(c, self[c]) for c in self.clients()]

    # checkpoints: the saved form is {cid: {name: cpu tensor}}, in insertion order
    def state_dict(self) -> dict[int, State]:
        return {c: clone(s, "cpu") for c, s in self._states.items()}

    def load_state_dict(self, saved: Mapping, like: Mapping[str, torch.Tensor], num_clients: int) -> None:
        """Restore `state_dict()`; ValueError if a saved state does not fit the adapter `like` (name -> tensor)."""
        names = {n: n for n in like}  # the model's own name strings, so that saved files pickle identically
        device = next(iter(like.values())).device if like else torch.device("cpu")
        states: dict[int, State] = {}
        for c, s in saved.items():
            c = int(c)
            if not 0 <= c < num_clients:
                raise ValueError(f"saved personal state of client {c}, but the run has {num_clients}")
            for k, v in s.items():
                ref = like.get(k)
                if ref is None or tuple(v.shape) != tuple(ref.shape) or v.dtype != ref.dtype:
                    raise ValueError(f"saved personal state of client {c} does not fit this adapter ({k})")
            states[c] = {names[k]: v for k, v in clone(s, device).items()}
        self._states = states


class DiskPersonalStore(PersonalStore):
    """A Flower node's personal state, durable in a directory of its own, so that a node that is killed and
    restarted (or a server that resumes from an earlier checkpoint) continues with it.

    Every phase that changes it writes a copy, atomically (a temporary file, then a rename), named by its
    position in the run: `r<round>-<phase>.pt`, phase order global < local. Once a phase of round r is named
    (`at(r, phase)`), `get` returns the newest copy written *before* that phase until the phase writes its
    own, so repeating a phase (a resumed server asks again) starts from exactly the state it started from
    the first time. Copies older
    than `keep` rounds are removed.
    """

    PHASES = {"global": 0, "local": 1}

    def __init__(self, root: Path, cid: int, keep: int = 3) -> None:
        super().__init__()
        self.root, self.cid, self.keep = Path(root), int(cid), max(1, keep)
        self.position = (1 << 30, 0)  # before any phase is named: the newest copy
        self.wrote = False  # this phase has written its copy: reads see it

    def at(self, rnd: int, phase: str) -> None:
        self.position, self.wrote = (int(rnd), self.PHASES[phase]), False

    def _copies(self) -> list[tuple[tuple[int, int], Path]]:
        out = []
        for p in self.root.glob("r*-*.pt"):
            rnd, _, phase = p.stem[1:].partition("-")
            if rnd.isdigit() and phase in self.PHASES:
                out.append(((int(rnd), self.PHASES[phase]), p))
        return sorted(out)

    def get(self, cid: int) -> State | None:
        if int(cid) != self.cid:
            return None
        before = [p for pos, p in self._copies() if pos < self.position or (self.wrote and pos == self.position)]
        return torch.load(before[-1], map_location="cpu", weights_only=True) if before else None

    def put(self, cid: int, state: Mapping[str, torch.Tensor]) -> None:
        if not state or int(cid) != self.cid:
            return
        rnd, phase = self.position
        name = f"r{rnd:06d}-{next(k for k, v in self.PHASES.items() if v == phase)}.pt"
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp"
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
        tmp.replace(self.root / name)  # never a torn file under the final name
        self.wrote = True
        for pos, p in self._copies():
            if pos[0] < rnd - self.keep:
                p.unlink(missing_ok=True)

    def clients(self) -> list[int]:
        return [self.cid] if self._copies() else []
