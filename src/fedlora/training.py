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
    loss: float = float("nan")
    diverged: bool = False


def collate(items: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it.input_ids)
        ids[i, :n] = torch.tensor(it.input_ids)
        labels[i, :n] = torch.tensor(it.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


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


def phase_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in key])


def sample_batches(data: Sequence[Encoded], steps: int, batch_size: int, grad_accum: int,
                   rng: np.random.Generator) -> list[list[list[Encoded]]]:
    """steps x grad_accum micro-batches, drawn without replacement from a shuffle, reshuffled when used up."""
    need = steps * grad_accum * batch_size
    order: list[int] = []
    while len(order) < need:
        order.extend(rng.permutation(len(data)).tolist())
    it = iter(order[:need])
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
        lr=lr, weight_decay=train_cfg.weight_decay, betas=(0.9, 0.999),
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
        counts = []
        encoded = [collate(mb, pad_id, am.device) for mb in micro_batches]
        counts = [int((b["labels"][:, 1:] != IGNORE).sum()) for b in encoded]
        step_tokens = max(1, sum(counts))
        step_loss = 0.0
        for b in encoded:
            loss_sum, _ = response_loss(am, b)
            (loss_sum / step_tokens).backward()
            step_loss += float(loss_sum.detach())
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
    am.model.eval()
    am.set_trainable(())
    stats.loss = total_loss / total_tokens if total_tokens else float("nan")
    return stats
