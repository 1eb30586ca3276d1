"""What one training step of the fair study's protocol costs on this machine, and what would make it cheaper.

The same drawn Dolly batches (batch 4 x <= 128 tokens, the fair study's protocol), SmolLM2 with a PEFT LoRA (r = 8,
alpha = 16, q/k/v/o), AdamW on the LoRA parameters, one torch thread; seconds per step (forward, backward,
optimizer), measured arm after arm in one process:

  fp32          float32 base model, eager (the fair study's setting)
  bf16          bfloat16 base model, eager (emulated, and slow, on a CPU without AVX512-BF16/AMX)
  fp32-compile  float32, torch.compile of the model (inductor); its compile time is printed apart
  fp32-sorted   float32, eager, each batch's rows drawn from one length bucket: the padding it would remove

Also prints the padding share of the protocol's batches. Ratios are to `fp32`, measured in this one run.

    .venv/bin/python benchmarks/step_cost.py [--steps 6] [--arms fp32,bf16,fp32-compile,fp32-sorted]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedlora.config import load_config
from fedlora.data.federated import load_examples
from fedlora.data.prompts import PromptFormatter
from fedlora.model import cpu_computes_bf16, load_base_model, load_tokenizer
from fedlora.training import collate


def batches(enc, steps: int, size: int, rng, sorted_by_length: bool):
    if not sorted_by_length:
        return [[enc[i] for i in rng.choice(len(enc), size, replace=False)] for _ in range(steps)]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
    starts = rng.choice(len(enc) - size, steps, replace=False)
    return [[enc[order[s + j]] for j in range(size)] for s in starts]


def step_seconds(model, bs, pad_id: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    out = []
    for b in bs:
        t = time.perf_counter()
        x = collate(b, pad_id, torch.device("cpu"))
        loss = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], labels=x["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    from peft import LoraConfig, get_peft_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/study/fair-dolly.yaml")
    p.add_argument("--steps", type=int, default=6, help="timed steps per arm (after one warm-up step)")
    p.add_argument("--arms", default="fp32,bf16,fp32-compile,fp32-sorted")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [])
    examples, _ = load_examples(cfg, warn=lambda m: None)
    tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
    fmt = PromptFormatter(tok, cfg.data.template, cfg.data.max_length)
    enc = [fmt.encode(e) for e in examples]
    lengths = np.array([len(e.input_ids) for e in enc])
    draws = np.random.default_rng(0).choice(lengths, size=(20000, cfg.train.batch_size))
    print(f"{len(enc)} rows, mean length {lengths.mean():.1f} tokens (max {cfg.data.max_length}); padding share of "
          f"random batches of {cfg.train.batch_size}: {1 - draws.mean() / draws.max(1).mean():.1%}; native bf16: "
          f"{cpu_computes_bf16()}; 1 thread")
    results = {}
    for arm in args.arms.split(","):
        dtype = torch.bfloat16 if arm == "bf16" else torch.float32
        model = load_base_model(cfg.model.name, torch.device("cpu"), dtype, cfg.model.cache_dir)
        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                                 target_modules=list(cfg.lora.target_modules)))
        model.train()
        n = min(2, args.steps) if arm == "bf16" else args.steps  # emulated bf16 is ~100x slower: 2 steps tell
        bs = batches(enc, n + 1, cfg.train.batch_size, np.random.default_rng(1), arm == "fp32-sorted")
        extra = ""
        if arm == "fp32-compile":
            model = torch.compile(model)
            t = time.perf_counter()
            step_seconds(model, bs[:1], tok.pad_token_id)
            extra = f"; compile + first step {time.perf_counter() - t:.1f} s"
            timed = step_seconds(model, bs[1:], tok.pad_token_id)
        else:
            timed = step_seconds(model, bs, tok.pad_token_id)[1:]
        results[arm] = float(np.median(timed))
        print(f"  {arm:13s} {results[arm]:7.2f} s/step (median of {len(timed)}){extra}", flush=True)
    if "fp32" in results:
        for arm, s in results.items():
            if arm != "fp32":
                print(f"ratio {arm} / fp32: {s / results['fp32']:.2f}")


if __name__ == "__main__":
    main()
