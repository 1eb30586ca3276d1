"""Evaluation: response-token loss and ROUGE-L (F) of greedy generations against the best-matching reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rouge_score import rouge_scorer

from .adapters import AdapterModel
from .data.examples import Example
from .data.prompts import PromptFormatter
from .training import collate, response_loss

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure against the best of several references (as Natural Instructions scores)."""
    return max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


@dataclass
class EvalResult:
    loss: float
    rouge_l: float | None
    examples: int
    tokens: int

    def as_dict(self) -> dict:
        return {"loss": self.loss, "rouge_l": self.rouge_l, "examples": self.examples, "tokens": self.tokens}


@torch.no_grad()
def eval_loss(am: AdapterModel, fmt: PromptFormatter, examples: Sequence[Example], batch_size: int) -> tuple[float, int]:
    am.model.eval()
    total, tokens = 0.0, 0
    encoded = [fmt.encode(e) for e in examples]
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i:i + batch_size], fmt.tok.pad_token_id, am.device)
        loss, n = response_loss(am, batch)
        total += float(loss)
        tokens += n
    return (total / tokens if tokens else float("nan")), tokens


@torch.no_grad()
def generate(am: AdapterModel, fmt: PromptFormatter, examples: Sequence[Example], max_new_tokens: int,
             batch_size: int) -> list[str]:
    """Greedy generations, left-padded batches."""
    am.model.eval()
    tok = fmt.tok
    outs: list[str] = []
    for i in range(0, len(examples), batch_size):
        prompts = [fmt.encode_prompt(e, max_new_tokens) for e in examples[i:i + batch_size]]
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
        for row in gen[:, width:]:
            outs.append(tok.decode(row, skip_special_tokens=True).strip())
    return outs


def evaluate(am: AdapterModel, fmt: PromptFormatter, examples: Sequence[Example], eval_cfg,
             max_examples: int) -> EvalResult:
    chosen = list(examples[:max_examples])
    loss, tokens = eval_loss(am, fmt, chosen, eval_cfg.batch_size)
    score = None
    if eval_cfg.generate and eval_cfg.max_gen_examples > 0:
        gen_set = chosen[: eval_cfg.max_gen_examples]
        preds = generate(am, fmt, gen_set, eval_cfg.max_new_tokens, eval_cfg.batch_size)
        score = sum(rouge_l(p, e.all_references()) for p, e in zip(preds, gen_set)) / len(gen_set)
    return EvalResult(loss, score, len(chosen), tokens)
