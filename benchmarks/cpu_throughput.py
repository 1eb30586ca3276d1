"""Target 7: training tokens/s of the project's client loop on CPU, before and after each optimization.

Arms, all on the same rows of one client (interleaved, after a one-step warm-up of each):

  naive        full-vocabulary logits loss (model(**batch, labels=labels)), torch's default AdamW (per-tensor loop
               on CPU), torch's default thread count
  resp-head    the LM head only at response positions (the project's `response_loss`), same AdamW
  project      the project's `train_phase` as it is now (response head, fused AdamW, no per-micro-batch syncs)
  bucketed     `train_phase` on length-bucketed batches (`sample_batches(..., by_length=True)`): the same rows,
               grouped by length, so less padding
  bucketed-tN  the same with N torch threads (--alt-threads, default: every core) instead of --threads (1); compare
               by wall clock only: a waiting thread spins and counts as CPU time
  bf16         (--bf16) the project loop on a bfloat16 copy of the base model (model.dtype=bfloat16): not the same
               numerics, listed as an option for CPUs with AVX512-BF16/AMX

tokens/s counts real (non-padding) tokens, so less padding shows as more tokens/s.

    .venv/bin/python benchmarks/cpu_throughput.py
    .venv/bin/python benchmarks/cpu_throughput.py --steps 6 --bf16 --alt-threads 1
"""

from __future__ import annotations

import os

import torch

import common
from fedlora.adapters import AdapterModel
from fedlora.data.prompts import PromptFormatter
from fedlora.training import phase_rng, sample_batches, train_phase


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--alt-threads", type=int, default=None,
                   help="also time the bucketed arm with this many threads (default: the number of cores)")
    p.add_argument("--bf16", action="store_true", help="also time the project loop on a bfloat16 base model")
    p.set_defaults(repeats=2)
    args = p.parse_args()
    device, dtype = common.setup(args)
    threads = torch.get_num_threads()
    alt = args.alt_threads or os.cpu_count()
    alt = alt if alt != threads else None
    cfg = common.bench_config(args, "method=fedit", "clients=1", f"train.batch_size={args.batch_size}",
                              f"max_length={args.max_length}", "max_rows=600")
    tok, base = common.load_model(args, device, dtype)
    data = common.load_data(cfg)
    fmt = PromptFormatter(tok, cfg.data.template, cfg.data.max_length)
    rows = [fmt.encode(e) for e in data.clients[0].train]
    t = cfg.train
    plain = sample_batches(rows, args.steps, t.batch_size, t.grad_accum, phase_rng(0, 1))
    bucketed = sample_batches(rows, args.steps, t.batch_size, t.grad_accum, phase_rng(0, 1), by_length=True)
    real = common.real_tokens(plain)
    assert real == common.real_tokens(bucketed)
    print(f"cpu_throughput: {args.steps} steps of batch {args.batch_size} x <= {args.max_length}: {real} real tokens; "
          f"padded {common.padded_tokens(plain)} (random batches) vs {common.padded_tokens(bucketed)} (bucketed)")
    print(common.describe(device, dtype))
    am = AdapterModel(base, "lora", cfg.lora, seed=0)
    kw = dict(lr=t.lr, max_grad_norm=t.max_grad_norm, pad_id=tok.pad_token_id, sync_each=True)

    def old_loop(batches, full_vocab: bool):
        """The client loop before the performance work: per-tensor AdamW, a host sync per micro-batch."""
        torch.set_num_threads(threads)
        params = [p for ps in am.set_trainable(["A", "B"]).values() for p in ps]
        common.plain_loop(am, params, batches, full_vocab=full_vocab, **kw)
        am.set_trainable(())

    def project(am_, batches, n_threads):
        torch.set_num_threads(n_threads)
        train_phase(am_, batches, {"A": 1.0, "B": 1.0}, lr=t.lr, train_cfg=t, pad_id=tok.pad_token_id)

    arms = {
        "naive": lambda b: old_loop(b, full_vocab=True),
        "resp-head": lambda b: old_loop(b, full_vocab=False),
        "project": lambda b: project(am, b, threads),
        "bucketed": lambda b: project(am, b if b is not None else bucketed, threads),
    }
    if alt:
        arms[f"bucketed-t{alt}"] = lambda b: project(am, b if b is not None else bucketed, alt)
    if args.bf16:
        _, base16 = common.load_model(args, device, torch.bfloat16)
        am16 = AdapterModel(base16, "lora", cfg.lora, seed=0)
        arms["bf16"] = lambda b: project(am16, b if b is not None else bucketed, threads)
    for name, fn in arms.items():  # warm-up: one step each
        fn(plain[:1])
    timed = {name: (lambda fn=fn, name=name: fn(None if name.startswith(("bucketed", "bf16")) else plain))
             for name, fn in arms.items()}
    times = common.interleaved(timed, args.repeats, device, warmup=0)
    torch.set_num_threads(threads)
    print(f"\n{'arm':14s} {'wall s':>8} {'real tok/s':>11} {'vs naive':>9} {'cpu s':>8} {'tok/cpu-s':>10} {'vs naive':>9}")
    w0, c0 = (real / common.median(times.wall["naive"]), real / common.median(times.cpu["naive"]))
    for name in times.wall:
        w, c = common.median(times.wall[name]), common.median(times.cpu[name])
        print(f"{name:14s} {w:8.2f} {real / w:11.1f} {real / w / w0:8.2f}x {c:8.2f} {real / c:10.1f} "
              f"{real / c / c0:8.2f}x")
    print(common.ratio_line(times, "naive", "resp-head") + "  (response-only LM head)")
    print(common.ratio_line(times, "resp-head", "project") + "  (fused AdamW, no per-micro-batch sync)")
    print(common.ratio_line(times, "project", "bucketed") + "  (length-bucketed batches)")
    if alt:
        print(common.ratio_line(times, "bucketed", f"bucketed-t{alt}", cpu=False) + f"  ({threads} vs {alt} threads)")
    print(common.ratio_line(times, "naive", "bucketed") + "  (before / after: the speed-up)")

if __name__ == "__main__":
    main()
