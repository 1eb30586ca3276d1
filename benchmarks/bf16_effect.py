"""The effect of a bfloat16 base model on the numbers: the same rows, the same adapter-free model, fp32 vs bf16.

Prints the response loss of the embedded SmolLM2 on the default job's global test rows in float32 and in bfloat16
(adapters, when trained, stay float32 either way), their difference, and the seconds each pass took. Where the CPU
has no native bf16 (no AVX512-BF16/AMX) the bf16 pass is emulated and slow: its *numbers* are still what a native
CPU computes up to summation order, its *time* is not.

    .venv/bin/python benchmarks/bf16_effect.py [--rows 32]
"""
from __future__ import annotations

import argparse
import time

import torch

from fedlora.config import load_config
from fedlora.data.federated import build_federated_data, load_examples
from fedlora.data.prompts import PromptFormatter
from fedlora.model import cpu_computes_bf16, load_base_model, load_tokenizer
from fedlora.training import collate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--config", default="configs/default.yaml")
    args = p.parse_args()
    cfg = load_config(args.config, [])
    data = build_federated_data(cfg, *load_examples(cfg, warn=lambda m: None))
    rows = [e for exs in data.global_test.values() for e in exs][: args.rows]
    tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
    fmt = PromptFormatter(tok, cfg.data.template, cfg.data.max_length)
    enc = [fmt.encode(e) for e in rows]
    print(f"native bf16 on this CPU: {cpu_computes_bf16()}; {len(rows)} global test rows")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_base_model(cfg.model.name, torch.device("cpu"), dtype, cfg.model.cache_dir)
        model.eval()
        total, tokens, t0 = 0.0, 0, time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(enc), 8):
                b = collate(enc[i:i + 8], tok.pad_token_id, torch.device("cpu"))
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
                lp = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), b["labels"][:, 1:],
                                                       ignore_index=-100, reduction="sum")
                total += float(lp)
                tokens += int((b["labels"][:, 1:] != -100).sum())
        out[dtype] = (total / tokens, time.perf_counter() - t0)
        print(f"{str(dtype):15s} response loss {out[dtype][0]:.4f}  ({out[dtype][1]:.1f} s)")
    d = out[torch.bfloat16][0] - out[torch.float32][0]
    print(f"bf16 - fp32: {d:+.4f} loss ({d / out[torch.float32][0]:+.2%}); time ratio bf16/fp32 "
          f"{out[torch.bfloat16][1] / out[torch.float32][1]:.2f}")


if __name__ == "__main__":
    main()
