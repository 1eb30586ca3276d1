"""What an evaluation of the fair study costs, and whether a larger evaluation batch makes it cheaper.

An evaluation scores the loss of every held-out row and greedily generates up to `max_new_tokens` for some of
them (ROUGE-L). Decoding one token reads every weight of the model once per batch, so on a CPU the seconds per
generated token may fall with the batch size. Arms, on the same Dolly prompts of the fair study's protocol
(SmolLM2 with a PEFT LoRA r = 8 on q/k/v/o, its B drawn at random so that it changes the model, the project's `evaluate.generate` and
`evaluate.row_losses`, one torch thread), timed arm after arm in one process:

  gen-b<k>    greedy generation of --gen prompts, eval batch k
  loss-b<k>   the loss of --rows rows, eval batch k

Prints seconds per arm, the ratios to the study's batch (8), and whether the generations and losses are the same
at every batch size (a faster batch size is only worth taking if it changes no number).

    .venv/bin/python benchmarks/eval_cost.py [--gen 32] [--rows 64] [--batches 8,16,32] [--repeats 2]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import base_parser, bench_config, describe, interleaved, load_data, load_model, median, setup  # noqa: E402


def main() -> None:
    from fedlora.adapters import AdapterModel
    from fedlora.data.prompts import PromptFormatter
    from fedlora.evaluate import generate, row_losses

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--gen", type=int, default=32, help="prompts to generate for")
    p.add_argument("--rows", type=int, default=64, help="rows to score the loss of")
    p.add_argument("--batches", default="8,16,32", help="evaluation batch sizes; the first is the reference")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--b-std", type=float, default=0.02, help="LoRA B drawn from N(0, std) so the adapter is active")
    p.add_argument("--kinds", default="gen,loss", help="arms: gen, loss or both")
    args = p.parse_args()
    device, dtype = setup(args)
    print(describe(device, dtype))
    cfg = bench_config(args, "max_rows=2400", "max_length=128", "clients=4", "partition=dirichlet", "data.alpha=0.1")
    data = load_data(cfg)
    rows = [e for c in data.clients for e in c.test][: max(args.gen, args.rows)]
    tok, base = load_model(args, device, dtype)
    am = AdapterModel(base, "lora", cfg.lora, seed=0, base_name=cfg.model.name)
    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that changes the model, as a trained one does (PEFT starts B at zero)
        for name, param in am.model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, args.b_std)
    fmt = PromptFormatter(tok, cfg.data.template, cfg.data.max_length)
    sizes = [int(b) for b in args.batches.split(",")]
    outputs: dict[str, object] = {}

    def arm(kind: str, b: int):
        def run():
            if kind == "gen":
                outputs[f"gen-b{b}"] = generate(am, fmt, rows[: args.gen], args.max_new_tokens, b)
            else:
                outputs[f"loss-b{b}"] = row_losses(am, fmt, rows[: args.rows], b)
        return run

    arms = {f"{k}-b{b}": arm(k, b) for k in args.kinds.split(",") for b in sizes}
    times = interleaved(arms, args.repeats, device)
    ref = sizes[0]
    print(f"\n{args.gen} generations of <= {args.max_new_tokens} new tokens, {args.rows} loss rows; medians of "
          f"{args.repeats} repeats (wall / cpu seconds)")
    print("| arm | wall s | cpu s | cpu ratio to batch %d | same numbers as batch %d |" % (ref, ref))
    print("|---|---|---|---|---|")
    for name in arms:
        kind = name.split("-")[0]
        base_name = f"{kind}-b{ref}"
        same = outputs[name] == outputs[base_name] if kind == "gen" else max(
            abs(a[0] / max(a[1], 1) - b[0] / max(b[1], 1)) for a, b in zip(outputs[name], outputs[base_name]))
        shown = same if kind == "gen" else f"largest loss difference {same:.1e}"
        print(f"| {name} | {median(times.wall[name]):.2f} | {median(times.cpu[name]):.2f} | "
              f"{median(times.cpu[name]) / median(times.cpu[base_name]):.3f} | {shown} |")


if __name__ == "__main__":
    main()
