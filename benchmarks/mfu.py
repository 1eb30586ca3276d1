"""Target 5 (second part): model FLOPs utilization of the project's training step on a random ~1B LLaMA.

The model is built from a config only (TinyLlama-1.1B's shape by default: 22 layers, hidden 2048, MLP 5632,
32 query / 4 key-value heads, vocabulary 32000), randomly initialized, bf16 on CUDA. Rows are random token ids
of full length with every token a response token (no padding, the LM head at every position), trained by the
project's `train_phase` with LoRA r=8 on q/k/v/o (or all weights with --full, a plain loop).

Model FLOPs per token (counted, not measured): forward = 2 x (layer weights + LM head) + attention
(4 x layers x hidden x sequence, causal masking not discounted); the backward pass of LoRA training computes
input gradients only (frozen weights: 1 x forward), full training also weight gradients (2 x forward).
MFU = model FLOPs / time / peak. The peak defaults to the dense bf16 figure of the detected GPU (H100/H200
989 TFLOP/s, A100 312); pass --peak-tflops otherwise (the CPU figure is only a smoke test).

    .venv/bin/python benchmarks/mfu.py --device cuda                                   # batch 8 x 2048
    .venv/bin/python benchmarks/mfu.py --device cpu --layers 2 --hidden 128 --intermediate 256 --heads 4 \
        --kv-heads 2 --vocab 1000 --batch-size 2 --seq 64 --steps 2 --peak-tflops 1
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import common
from fedlora.adapters import AdapterModel
from fedlora.config import LoraConfig, TrainConfig
from fedlora.data.prompts import Encoded
from fedlora.training import collate, train_phase

PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--full", action="store_true", help="full fine-tuning (all weights, plain loop) instead of LoRA")
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args()
    device, dtype = common.setup(args)
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAKS.items() if k in name), None)
    if peak is None:
        raise SystemExit("pass --peak-tflops (the device's dense bf16/fp32 peak) for this device")
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq),
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    for q in model.parameters():
        q.requires_grad_(False)
    layer_params = sum(q.numel() for q in model.model.layers.parameters())
    head_params = model.lm_head.weight.numel()
    fwd = 2 * (layer_params + head_params) + 4 * args.layers * args.hidden * args.seq
    per_token = fwd * (3 if args.full else 2)
    rng = np.random.default_rng(0)
    rows = [[Encoded(ids, list(ids)) for ids in rng.integers(2, args.vocab, (args.batch_size, args.seq)).tolist()]]
    batches = [rows for _ in range(args.steps)]
    tokens = args.steps * args.batch_size * args.seq
    train = TrainConfig(lr=1e-4)
    print(f"mfu: random LLaMA {(layer_params + head_params + model.model.embed_tokens.weight.numel()) / 1e6:,.1f} M "
          f"parameters, {args.layers} layers, hidden {args.hidden}; {'full' if args.full else 'LoRA r=8 q/k/v/o'}; "
          f"batch {args.batch_size} x {args.seq}, {args.steps} steps; {per_token / 1e9:.4g} GFLOP/token")
    print(common.describe(device, dtype))
    if args.full:
        for q in model.parameters():
            q.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def run(bs):
            model.train()
            for step in bs:
                for mb in step:
                    model(**collate(mb, 0, device)).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    else:
        am = AdapterModel(model, "lora", LoraConfig(dropout=0.0), seed=0)

        def run(bs):
            train_phase(am, bs, {"A": 1.0, "B": 1.0}, lr=train.lr, train_cfg=train, pad_id=0)

    run(batches[:1])  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = common.interleaved({"step": lambda: run(batches)}, args.repeats, device, warmup=0)
    sec = common.median(times.wall["step"])
    achieved = per_token * tokens / sec / 1e12
    print(f"{tokens / sec:,.0f} tokens/s, {achieved:.4g} TFLOP/s model FLOPs, peak {peak:g} TFLOP/s -> "
          f"MFU {100 * achieved / peak:.1f} % (target >= 40 %)")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
