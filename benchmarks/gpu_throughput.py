"""Target 5: training tokens/s of the project's client loop / a naive PEFT bf16 loop, on the same rows (GPU).

  naive     PEFT LoRA on the bf16 model, model(**batch, labels=labels).loss (fp32 logits over the whole vocabulary
            at every position), torch's default AdamW, random batches
  project   the project's `train_phase` (LM head and loss only at response positions, fused AdamW, one host sync
            per step), the same random batches
  bucketed  `train_phase` on length-bucketed batches of the same rows (`sample_batches(..., by_length=True)`)

tokens/s counts real (non-padding) tokens. Peak GPU memory per arm is printed on CUDA. Written for a GPU
machine (not run in this project's CPU-only sessions); runs on CPU at a tiny size as a smoke test:

    .venv/bin/python benchmarks/gpu_throughput.py --device cuda                       # 32 x 512, SmolLM2, bf16
    .venv/bin/python benchmarks/gpu_throughput.py --device cpu --model tiny --batch-size 2 --max-length 64 --steps 2
"""

from __future__ import annotations

import torch

import common
from fedlora.adapters import AdapterModel
from fedlora.data.prompts import PromptFormatter
from fedlora.training import phase_rng, sample_batches, train_phase


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-rows", type=int, default=3000)
    args = p.parse_args()
    device, dtype = common.setup(args)
    cfg = common.bench_config(args, "method=fedit", "clients=1", f"train.batch_size={args.batch_size}",
                              f"max_length={args.max_length}", f"max_rows={args.max_rows}")
    tok, base = common.load_model(args, device, dtype)
    fmt = PromptFormatter(tok, cfg.data.template, cfg.data.max_length)
    rows = [fmt.encode(e) for e in common.load_data(cfg).clients[0].train]
    t = cfg.train
    plain = sample_batches(rows, args.steps, t.batch_size, t.grad_accum, phase_rng(0, 1))
    bucketed = sample_batches(rows, args.steps, t.batch_size, t.grad_accum, phase_rng(0, 1), by_length=True)
    real = common.real_tokens(plain)
    print(f"gpu_throughput: {args.steps} steps of batch {args.batch_size} x <= {args.max_length}: {real} real tokens, "
          f"padded {common.padded_tokens(plain)} (random) / {common.padded_tokens(bucketed)} (bucketed)")
    print(common.describe(device, dtype))
    am = AdapterModel(base, "lora", cfg.lora, seed=0)
    peaks: dict[str, float] = {}

    def arm(name, fn):
        def run():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            fn()
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
        return run

    def naive_loop(batches):
        params = [p for ps in am.set_trainable(["A", "B"]).values() for p in ps]
        common.plain_loop(am, params, batches, lr=t.lr, max_grad_norm=t.max_grad_norm, pad_id=tok.pad_token_id)
        am.set_trainable(())

    def project(batches):
        train_phase(am, batches, {"A": 1.0, "B": 1.0}, lr=t.lr, train_cfg=t, pad_id=tok.pad_token_id)

    arms = {
        "naive": arm("naive", lambda: naive_loop(plain)),
        "project": arm("project", lambda: project(plain)),
        "bucketed": arm("bucketed", lambda: project(bucketed)),
    }
    naive_loop(plain[:1])  # warm-up
    project(plain[:1])
    times = common.interleaved(arms, args.repeats, device, warmup=0)
    cpu = device.type == "cpu"
    print(f"\n{'arm':10s} {'median s':>9} {'real tok/s':>11} {'peak GiB':>9}")
    for name, v in times.wall.items():
        peak = f"{peaks[name]:9.2f}" if name in peaks else f"{'-':>9}"
        print(f"{name:10s} {common.median(v):9.3f} {real / common.median(v):11.0f} {peak}")
    print(common.ratio_line(times, "naive", "project", "", cpu) + "  (= project tok/s / naive tok/s)")
    print(common.ratio_line(times, "naive", "bucketed", ">= 3 on the GPU", cpu) + "  (= bucketed tok/s / naive tok/s)")

if __name__ == "__main__":
    main()
