"""Where clients' personal components live, and the only code that reads or writes them.

A personal component (fedlora_opt's `B.mag`, FedSA-LoRA's `B`, FedDPA's second LoRA, ...) is trained
on its client and never leaves it: no message, no server state, no global model holds it. One
`PersonalStore` holds the personal state of the clients hosted in one process:

  * the in-process simulator: every client's, in one `PersonalStore` (checkpointed with the run);
  * a Flower node: its own client's, in the node's `Context.state` (`ContextPersonalStore`).

What a personal state *means* relative to the global value (a value, or an offset in `offset`
mode) is the method's business: see `core.protocol`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

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


class ContextPersonalStore(PersonalStore):
    """A Flower node's personal state, kept in its `Context.state` (one ArrayRecord per client it hosts)."""

    PREFIX = "fedlora.personal"

    def __init__(self, context) -> None:
        super().__init__()
        self.context = context

    def _key(self, cid: int) -> str:
        return f"{self.PREFIX}.{int(cid)}"

    def get(self, cid: int) -> State | None:
        rec = self.context.state.array_records.get(self._key(cid))
        return dict(rec.to_torch_state_dict()) if rec is not None else None

    def put(self, cid: int, state: Mapping[str, torch.Tensor]) -> None:
        from flwr.app import ArrayRecord

        if state:
            self.context.state[self._key(cid)] = ArrayRecord({k: v.detach().cpu() for k, v in state.items()})

    def clients(self) -> list[int]:
        n = len(self.PREFIX) + 1
        return sorted(int(k[n:]) for k in self.context.state.array_records if k.startswith(self.PREFIX + "."))
