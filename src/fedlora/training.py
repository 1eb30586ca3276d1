"""The client's training phase: a few optimizer steps on chosen components, loss on response tokens only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import AdapterModel
from .core.methods import ProximalTerm
from .data.prompts import IGNORE, Encoded


@dataclass
class PhaseStats:
    examples: int = 0
    steps: int = 0
    tokens: int = 0
    """Tokens the phase trained on (prompt and response, no padding): equal compute is steps and tokens."""
    loss: float = float("nan")
    diverged: bool = False


def collate(items: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Pad a micro-batch: input ids, labels and attention mask, built in ONE host array and moved in one copy."""
    width = max(len(it.input_ids) for it in items)
    host = np.empty((3, len(items), width), dtype=np.int64)
    host[0], host[1], host[2] = pad_id, IGNORE, 0
    for i, it in enumerate(items):
        n = len(it.input_ids)
        host[0, i, :n] = it.input_ids
        host[1, i, :n] = it.labels
        host[2, i, :n] = 1
    both = torch.from_numpy(host)
    if torch.device(device).type == "cuda":
        both = both.pin_memory().to(device, non_blocking=True)
    else:
        both = both.to(device)
    return {"input_ids": both[0], "labels": both[1], "attention_mask": both[2]}


def response_loss(am: AdapterModel, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over response tokens, and their count.

    The LM head runs only at positions whose next token is a response token, which avoids
    materializing logits over the whole vocabulary for prompt and padding positions.
    """
    inner = am.model.get_base_model()
    hidden = inner.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = inner.get_output_embeddings()(hidden[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def _response_index(items: Sequence[Encoded], width: int) -> np.ndarray:
    """Flat positions (row * width + t) whose NEXT token is a response token, computed on the host from the labels.

    The same positions, in the same order, as `response_loss`'s boolean mask, without a device-to-host sync.
    """
    labels = np.full((len(items), width), IGNORE, dtype=np.int64)
    for i, it in enumerate(items):
        labels[i, :len(it.labels)] = it.labels
    rows, cols = np.nonzero(labels[:, 1:] != IGNORE)
    return rows * width + cols


def _response_loss_at(am: AdapterModel, batch: Mapping[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """`response_loss`'s summed loss, with the response positions given (no sync, no mask nonzero on the device)."""
    inner = am.model.get_base_model()
    hidden = inner.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    targets = batch["labels"].reshape(-1).index_select(0, index + 1)
    logits = inner.get_output_embeddings()(flat)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _adamw_impl(groups: Mapping[str, list[torch.nn.Parameter]]) -> dict:
    """Fused AdamW (one kernel over all tensors) where torch has it; ~6x faster than the per-tensor loop on CPU
    for a LoRA's ~240 small tensors. Same update up to float rounding."""
    devices = {p.device.type for ps in groups.values() for p in ps}
    dtypes = {p.dtype for ps in groups.values() for p in ps}
    if devices <= {"cpu", "cuda"} and dtypes <= {torch.float32, torch.float16, torch.bfloat16, torch.float64}:
        return {"fused": True}
    return {}


def phase_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in key])


def sample_batches(data: Sequence[Encoded], steps: int, batch_size: int, grad_accum: int,
                   rng: np.random.Generator, by_length: bool = False) -> list[list[list[Encoded]]]:
    """steps x grad_accum micro-batches, drawn without replacement from a shuffle, reshuffled when used up.

    by_length: the same drawn rows, grouped into micro-batches of similar length (less padding), the micro-batches
    then in a seeded random order. Off by default: it changes which rows share a step.
    """
    need = steps * grad_accum * batch_size
    order: list[int] = []
    while len(order) < need:
        order.extend(rng.permutation(len(data)).tolist())
    order = order[:need]
    if by_length:
        order = sorted(order, key=lambda i: len(data[i].input_ids))
        chunks = [order[j:j + batch_size] for j in range(0, need, batch_size)]
        order = [i for c in rng.permutation(len(chunks)).tolist() for i in chunks[c]]
    it = iter(order)
    return [[[data[next(it)] for _ in range(batch_size)] for _ in range(grad_accum)] for _ in range(steps)]


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_phase(am: AdapterModel, batches: list[list[list[Encoded]]], trainable: Mapping[str, float], *,
                lr: float, train_cfg, pad_id: int, loss_terms: Sequence[ProximalTerm] = (),
                anchor: Mapping[str, torch.Tensor] | None = None, torch_seed: int = 0) -> PhaseStats:
    """Train `trainable` components (-> lr multiplier) over the given batches; the model's state changes in place."""
    stats = PhaseStats()
    groups = am.set_trainable(trainable)
    if not groups or not batches:
        return stats
    opt = torch.optim.AdamW(
        [{"params": ps, "lr": lr * trainable[c]} for c, ps in groups.items()],
        lr=lr, weight_decay=train_cfg.weight_decay, betas=(0.9, 0.999), **_adamw_impl(groups),
    )
    base_lrs = [g["lr"] for g in opt.param_groups]
    prox = [(t.mu, n, p) for t in loss_terms for n, p in am.params.items() if p.requires_grad and anchor and n in anchor]
    params = [p for ps in groups.values() for p in ps]
    torch.manual_seed(torch_seed)
    am.model.train()
    total_loss, total_tokens = 0.0, 0
    for step, micro_batches in enumerate(batches):
        factor = _lr_factor(step, len(batches), train_cfg.warmup_steps, train_cfg.schedule)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * factor
        # token counts and response positions come from the host-side labels: no device sync before the step ends
        indices = [_response_index(mb, max(len(it.input_ids) for it in mb)) for mb in micro_batches]
        step_tokens = max(1, sum(len(ix) for ix in indices))
        losses = []
        for mb, ix in zip(micro_batches, indices):
            b = collate(mb, pad_id, am.device)
            loss_sum = _response_loss_at(am, b, torch.from_numpy(ix).to(am.device, non_blocking=True))
            (loss_sum / step_tokens).backward()
            losses.append(loss_sum.detach())
        step_loss = sum(float(x) for x in losses)  # the step's one sync (divergence check below)
        if prox:
            reg = sum(0.5 * mu * (p - anchor[n].to(p.device)).pow(2).sum() for mu, n, p in prox)
            reg.backward()
        if not math.isfinite(step_loss):
            stats.diverged = True
            opt.zero_grad(set_to_none=True)
            break
        if train_cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total_loss += step_loss
        total_tokens += step_tokens
        stats.steps += 1
        stats.examples += sum(len(mb) for mb in micro_batches)
        stats.tokens += sum(len(it.input_ids) for mb in micro_batches for it in mb)
    am.model.eval()
    am.set_trainable(())
    stats.loss = total_loss / total_tokens if total_tokens else float("nan")
    return stats
