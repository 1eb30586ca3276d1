"""The optimized training step computes what a plain PEFT loop computes (full-vocabulary loss, per-tensor AdamW).

No timing here (that is benchmarks/); only that the speed-ups left the results unchanged up to float rounding.
"""

import numpy as np
import pytest
import torch
from conftest import DOLLY

from fedlora.adapters import AdapterModel
from fedlora.config import load_config
from fedlora.data.federated import load_examples
from fedlora.data.prompts import IGNORE, PromptFormatter
from fedlora.training import collate, phase_rng, sample_batches, train_phase


def _rows(tok, n=24, max_length=64):
    cfg = load_config(None, [f"data.path={DOLLY}", f"max_length={max_length}"])
    examples, _ = load_examples(cfg, warn=lambda m: None)
    fmt = PromptFormatter(tok, "plain", max_length)
    return [fmt.encode(e) for e in examples[:n]], cfg


def _reference_collate(items, pad_id):
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it.input_ids)
        ids[i, :n] = torch.tensor(it.input_ids)
        labels[i, :n] = torch.tensor(it.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _reference_sample(data, steps, batch_size, grad_accum, rng):
    need = steps * grad_accum * batch_size
    order = []
    while len(order) < need:
        order.extend(rng.permutation(len(data)).tolist())
    it = iter(order[:need])
    return [[[data[next(it)] for _ in range(batch_size)] for _ in range(grad_accum)] for _ in range(steps)]


def test_collate_matches_reference(tok):
    rows, _ = _rows(tok, 6)
    got = collate(rows, tok.pad_token_id, torch.device("cpu"))
    want = _reference_collate(rows, tok.pad_token_id)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_sample_batches_default_unchanged_and_by_length_same_rows(tok):
    rows, _ = _rows(tok, 24)
    a = sample_batches(rows, 5, 4, 2, phase_rng(0, 1, 2, 1))
    b = _reference_sample(rows, 5, 4, 2, phase_rng(0, 1, 2, 1))
    assert [[[id(x) for x in mb] for mb in s] for s in a] == [[[id(x) for x in mb] for mb in s] for s in b]
    c = sample_batches(rows, 5, 4, 2, phase_rng(0, 1, 2, 1), by_length=True)
    flat = lambda bs: sorted(id(x) for s in bs for mb in s for x in mb)  # noqa: E731
    assert flat(c) == flat(a)

    def padded(bs):
        return sum(len(mb) * max(len(x.input_ids) for x in mb) for s in bs for mb in s)

    assert padded(c) <= padded(a)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_train_phase_equals_plain_peft_loop(tok, grad_accum):
    from tiny import tiny_model

    rows, cfg = _rows(tok, 24)
    cfg = load_config(None, [f"data.path={DOLLY}", "lora.dropout=0.05", f"train.grad_accum={grad_accum}"])
    t = cfg.train
    batches = sample_batches(rows, 4, 3, grad_accum, np.random.default_rng(5))

    am = AdapterModel(tiny_model(len(tok)), "lora", cfg.lora, seed=0)
    stats = train_phase(am, batches, {"A": 1.0, "B": 1.0}, lr=1e-2, train_cfg=t, pad_id=tok.pad_token_id,
                        torch_seed=123)
    ours = am.state()

    ref = AdapterModel(tiny_model(len(tok)), "lora", cfg.lora, seed=0)
    params = [p for ps in ref.set_trainable(["A", "B"]).values() for p in ps]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=t.weight_decay, foreach=False)
    torch.manual_seed(123)
    ref.model.train()
    total = 0.0
    for micro in batches:
        encoded = [_reference_collate(mb, tok.pad_token_id) for mb in micro]
        tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in encoded)
        for b in encoded:
            n = int((b["labels"][:, 1:] != IGNORE).sum())
            loss = ref.model(**b).loss  # HF: full-vocabulary logits, mean over this micro-batch's response tokens
            (loss * n / tokens).backward()
            total += float(loss) * n
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    theirs = ref.state()
    moved = max(float((ours[k] - ref.init_state[k]).abs().max()) for k in ours)
    assert moved > 1e-2  # training changed the adapter by far more than the tolerance below
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-5, rtol=1e-5), k  # fused vs per-tensor AdamW rounding
    tokens_all = sum(int((_reference_collate(mb, 0)["labels"][:, 1:] != IGNORE).sum()) for s in batches for mb in s)
    assert stats.loss == pytest.approx(total / tokens_all, rel=1e-5)
