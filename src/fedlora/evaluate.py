"""Evaluation: response-token loss and ROUGE-L (F) of greedy generations against the best-matching reference."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .adapters import AdapterModel
from .data.examples import Example
from .data.prompts import PromptFormatter
from .training import IGNORE, collate


@cache
def _scorer():
    """Built on first use: rouge_score imports nltk (~0.6 s), which a process that only trains never needs."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure against the best of several references (as Natural Instructions scores)."""
    scorer = _scorer()
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


@dataclass
class EvalResult:
    loss: float
    rouge_l: float | None
    examples: int
    tokens: int

    def as_dict(self) -> dict:
        return {"loss": self.loss, "rouge_l": self.rouge_l, "examples": self.examples, "tokens": self.tokens}


@torch.no_grad()
def row_losses(am: AdapterModel, fmt: PromptFormatter, examples: Sequence[Example],
               batch_size: int) -> list[tuple[float, int]]:
    """(summed response-token loss, response tokens) of every example, in batches of similar length."""
    am.model.eval()
    encoded = [fmt.encode(e) for e in examples]
    order = sorted(range(len(encoded)), key=lambda k: len(encoded[k].input_ids))  # less padding
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    inner = am.model.get_base_model()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        batch = collate([encoded[k] for k in idx], fmt.tok.pad_token_id, am.device)
        hidden = inner.get_decoder()(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        logits = inner.get_output_embeddings()(hidden[:, :-1][keep])
        per_token = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        row = keep.nonzero()[:, 0]
        sums = torch.zeros(len(idx), dtype=torch.float64, device=per_token.device).index_add_(
            0, row, per_token.double())
        counts = keep.sum(1)
        for j, k in enumerate(idx):
            out[k] = (float(sums[j]), int(counts[j]))
    return out


@torch.no_grad()
def generate(am: AdapterModel, fmt: PromptFormatter, examples: Sequence[Example], max_new_tokens: int,
             batch_size: int) -> list[str]:
    """Greedy generations, in the order of `examples`; left-padded batches of prompts of similar length."""
    am.model.eval()
    tok = fmt.tok
    encoded = [fmt.encode_prompt(e, max_new_tokens) for e in examples]
    order = sorted(range(len(encoded)), key=lambda k: len(encoded[k]))  # less padding, shorter KV caches
    outs: list[str] = [""] * len(encoded)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        prompts = [encoded[k] for k in idx]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        gen = am.model.generate(
            input_ids=ids.to(am.device), attention_mask=mask.to(am.device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        for k, row in zip(idx, gen[:, width:]):
            outs[k] = tok.decode(row, skip_special_tokens=True).strip()
    return outs


def evaluate(am: AdapterModel, fmt: PromptFormatter, examples: Sequence[Example], eval_cfg,
             max_examples: int) -> EvalResult:
    """Loss on the first `max_examples` rows, ROUGE-L on the first `eval.max_gen_examples` of them."""
    return evaluate_groups(am, fmt, {0: examples}, eval_cfg, max_examples)[0]


def evaluate_groups(am: AdapterModel, fmt: PromptFormatter, groups: Mapping[Hashable, Sequence[Example]], eval_cfg,
                    max_examples: int) -> dict[Hashable, EvalResult]:
    """`evaluate` of several row sets (e.g. the global test set's categories) at once: the rows of all groups share
    batches, so many small groups cost what one large set costs; each group's numbers are its own.

    Parametrized weights (the magnitude/direction factors) are composed once for the whole evaluation
    (`parametrize.cached`), not at every forward of every generated token.
    """
    chosen = {g: list(rows[:max_examples]) for g, rows in groups.items()}
    flat = [(g, e) for g, rows in chosen.items() for e in rows]
    gen = [(g, e) for g, rows in chosen.items() for e in rows[: eval_cfg.max_gen_examples]] \
        if eval_cfg.generate and eval_cfg.max_gen_examples > 0 else []
    with parametrize.cached():
        losses = row_losses(am, fmt, [e for _, e in flat], eval_cfg.batch_size)
        preds = (generate(am, fmt, [e for _, e in gen], eval_cfg.max_new_tokens, eval_cfg.gen_batch_size)
                 if gen else [])
    out = {}
    for g, rows in chosen.items():
        mine = [lt for (gg, _), lt in zip(flat, losses) if gg == g]
        total, tokens = sum(l for l, _ in mine), sum(n for _, n in mine)
        scores = [rouge_l(p, e.all_references()) for (gg, e), p in zip(gen, preds) if gg == g]
        out[g] = EvalResult(total / tokens if tokens else float("nan"),
                            sum(scores) / len(scores) if scores else None, len(rows), tokens)
    return out
