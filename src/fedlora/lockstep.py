"""Several clients' training phases in ONE batched forward/backward over the shared frozen base model.

Each client's adapter tensors are stacked along a leading client axis. For the length of a phase every LoRA
layer computes base(x) + scaling · B_k A_k x, with k the client of each example, as one batched matmul over
the client axis (how multi-LoRA serving systems batch adapters), so the frozen base runs once for all
clients. The loss is the sum over clients of each client's own response-token loss, so each client's
gradient is exactly the one it would get alone; one AdamW over the stacked tensors is K independent AdamWs
(Adam is elementwise); gradient clipping is per client. With `lora.dropout: 0` the result equals K
sequential `train_phase` calls up to float rounding (tested); with dropout the masks differ.

Supports the adapter kinds whose class says `lockstep` (their layers are base(x) + scaling · B A x with the
kind's `factors`: `lora`, `magdir`) and phases without loss terms; `reason_unsupported` says why not
otherwise, and the caller falls back to sequential training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .adapter_kinds import KINDS
from .adapters import AdapterModel
from .core.components import State
from .data.prompts import Encoded
from .training import PhaseStats, _adamw_impl, _lr_factor, _response_index, collate

Batches = list[list[list[Encoded]]]  # steps x micro-batches x rows


def reason_unsupported(am: AdapterModel, batches: Sequence[Batches], has_loss_terms: bool) -> str | None:
    """Why these phases cannot run in lockstep (None: they can)."""
    if not am.impl.lockstep:
        supported = " and ".join(name for name, kind in KINDS.items() if kind.lockstep)
        return f"adapter kind {am.kind!r} (lockstep supports {supported})"
    if has_loss_terms:
        return "the method adds loss terms (e.g. FedProx)"
    if len(batches) < 2:
        return "fewer than two clients"
    shapes = {(len(b), tuple(len(mb) for step in b for mb in step)) for b in batches}
    if len(shapes) != 1:
        return "the clients' phases differ in steps or micro-batch sizes"
    return None


class _StackedLayers:
    """The clients' stacked adapter tensors and the patched forward of every LoRA layer."""

    def __init__(self, am: AdapterModel, starts: Sequence[State], trainable: Mapping[str, float]):
        self.am, self.k = am, len(starts)
        self.tensors: dict[str, torch.Tensor] = {}
        for name, param in am.params.items():
            t = torch.stack([s[name].to(param.device, param.dtype) for s in starts])
            self.tensors[name] = t.requires_grad_(am.components[name] in trainable)
        self.layers = list(am.lora_layers())

    def weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `name`'s stacked effective factors: A [K, r, in], B [K, out, r]."""
        return self.am.impl.factors(self.tensors, name)

    def __enter__(self):
        for name, layer in self.layers:
            layer.forward = self._forward(layer, name)
        return self

    def __exit__(self, *exc):
        for _, layer in self.layers:
            del layer.forward  # back to the class's (PEFT's) forward
        return False

    def _forward(self, layer, name):
        k = self.k

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = layer.base_layer(x, *args, **kwargs)
            a, b = self.weights(name)
            h = layer.lora_dropout["default"](x.to(a.dtype))
            lead = h.shape[:-1]
            h = h.reshape(k, -1, h.shape[-1])  # examples are client-major: rows [k*b, (k+1)*b) are client k's
            delta = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2)) * layer.scaling["default"]
            return (result + delta.reshape(*lead, -1)).to(result.dtype)

        return forward

    def states(self) -> list[State]:
        return [{n: t[i].detach().clone() for n, t in self.tensors.items()} for i in range(self.k)]


def train_lockstep(am: AdapterModel, starts: Sequence[State], batches: Sequence[Batches],
                   trainable: Mapping[str, float], *, lr: float, train_cfg, pad_id: int,
                   torch_seed: int = 0) -> tuple[list[State], list[PhaseStats]]:
    """Train K clients at once: client i starts from `starts[i]` and sees `batches[i]`, as `train_phase` would.

    Returns each client's trained adapter state and its PhaseStats. A client whose loss becomes NaN/Inf
    stops there (its state is the one before that step, its stats count the steps before), as in
    `train_phase`; the others go on.
    """
    k = len(starts)
    stats = [PhaseStats() for _ in range(k)]
    am.set_trainable(())  # PEFT's own tensors are not used while the layers are patched
    stacked = _StackedLayers(am, starts, trainable)
    groups: dict[str, list[torch.Tensor]] = {}
    for name, t in stacked.tensors.items():
        if t.requires_grad:
            groups.setdefault(am.components[name], []).append(t)
    if not groups or not batches[0]:
        return stacked.states(), stats
    opt = torch.optim.AdamW([{"params": ps, "lr": lr * trainable[c]} for c, ps in groups.items()], lr=lr,
                            weight_decay=train_cfg.weight_decay, betas=(0.9, 0.999), **_adamw_impl(groups))
    base_lrs = [g["lr"] for g in opt.param_groups]
    params = [p for ps in groups.values() for p in ps]
    stopped: dict[int, State] = {}  # client -> its state before the step where it diverged
    totals = np.zeros(k)
    tokens_seen = np.zeros(k, dtype=np.int64)
    inner = am.model.get_base_model()
    device = am.device
    torch.manual_seed(torch_seed)
    am.model.train()
    with stacked:
        for step in range(len(batches[0])):
            factor = _lr_factor(step, len(batches[0]), train_cfg.warmup_steps, train_cfg.schedule)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * factor
            micro = [[batches[i][step][j] for i in range(k)] for j in range(len(batches[0][step]))]
            step_tokens = np.zeros(k, dtype=np.int64)
            for per_client in micro:
                for i, mb in enumerate(per_client):
                    step_tokens[i] += len(_response_index(mb, max(len(it.input_ids) for it in mb)))
            denom = torch.tensor(np.maximum(step_tokens, 1), dtype=torch.float32, device=device)
            step_loss = torch.zeros(k, device=device)
            for per_client in micro:
                rows = [it for mb in per_client for it in mb]
                width = max(len(it.input_ids) for it in rows)
                index = _response_index(rows, width)
                owner = torch.from_numpy(index // width // len(per_client[0])).to(device)
                index = torch.from_numpy(index).to(device)
                batch = collate(rows, pad_id, device)
                hidden = inner.get_decoder()(input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"]).last_hidden_state
                flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
                targets = batch["labels"].reshape(-1).index_select(0, index + 1)
                ce = F.cross_entropy(inner.get_output_embeddings()(flat).float(), targets, reduction="none")
                sums = torch.zeros(k, device=device).index_add(0, owner, ce)
                (sums / denom).sum().backward()
                step_loss += sums.detach()
            losses = step_loss.tolist()  # the step's one sync
            for i, loss in enumerate(losses):
                if i not in stopped and not math.isfinite(loss):
                    stopped[i] = {n: t[i].detach().clone() for n, t in stacked.tensors.items()}
                    stats[i].diverged = True
            with torch.no_grad():
                live = torch.tensor([0.0 if i in stopped else 1.0 for i in range(k)], device=device)
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(live.view(k, *[1] * (p.dim() - 1))).nan_to_num_(0.0)
                if train_cfg.max_grad_norm:
                    sq = sum(p.grad.pow(2).reshape(k, -1).sum(1) for p in params if p.grad is not None)
                    coef = (train_cfg.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(coef.view(k, *[1] * (p.dim() - 1)))
            opt.step()
            opt.zero_grad(set_to_none=True)
            for i in range(k):
                if i in stopped:
                    continue
                totals[i] += losses[i]
                tokens_seen[i] += max(1, int(step_tokens[i]))
                stats[i].steps += 1
                stats[i].examples += sum(len(mb[i]) for mb in micro)
                stats[i].tokens += sum(len(it.input_ids) for mb in micro for it in mb[i])
    am.model.eval()
    states = stacked.states()
    for i, state in stopped.items():
        states[i] = state
    for i in range(k):
        stats[i].loss = totals[i] / tokens_seen[i] if tokens_seen[i] else float("nan")
    return states, stats
