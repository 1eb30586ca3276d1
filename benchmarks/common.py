"""Shared pieces of the benchmark scripts: arguments, model/data loading, interleaved timing, memory.

Every ratio is measured in ONE process, the arms interleaved (A, B, A, B, ...) after a warm-up of each arm,
and reported as the ratio of the medians (and the median of the per-repeat ratios, which is less sensitive to
load changes between repeats when other jobs share the machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "databricks-dolly-15k.jsonl"
sys.path.insert(0, str(REPO / "tests"))  # tests/tiny.py: the tiny random model used for smoke runs


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: float32 on CPU, bfloat16 on CUDA (as the project's model.dtype)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 0: torch's choice. 1 by default: on a CPU shared with other jobs, 2+ "
                        "threads stall on each other, and one thread makes the CPU-time figures meaningful")
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), 'tiny' (random tiny LLaMA), hub id or dir")
    p.add_argument("--data", default=str(DOLLY), help="Dolly-format JSONL")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each arm (after one warm-up each)")
    return p


def setup(args) -> tuple[torch.device, torch.dtype]:
    from fedlora.model import pick_device, pick_dtype

    device = pick_device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    return device, pick_dtype(args.dtype, device)


def describe(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores visible, " \
                f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}"
    return f"device: {where}; dtype {str(dtype).replace('torch.', '')}; torch {torch.__version__}"


def load_model(args, device: torch.device, dtype: torch.dtype):
    """(tokenizer, frozen base model) for --model."""
    if args.model == "tiny":
        from tiny import tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        return tok, tiny_model(len(tok)).to(device=device, dtype=dtype)
    from fedlora.model import load_base_model, load_tokenizer

    return load_tokenizer(args.model), load_base_model(args.model, device, dtype)


def bench_config(args, *overrides: str):
    """A project Config for the benchmark: --data, the device/dtype, and the given overrides."""
    from fedlora.config import load_config

    model = "smollm2" if args.model == "tiny" else args.model
    return load_config(None, [f"data.path={args.data}", f"model.name={model}", f"model.device={args.device}",
                              f"model.dtype={args.dtype}", *overrides])


def load_data(cfg):
    from fedlora.data.federated import build_federated_data, load_examples

    examples, unseen = load_examples(cfg, warn=lambda m: None)
    return build_federated_data(cfg, examples, unseen)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Times:
    """Seconds per timed run of each arm: wall clock, and this process's CPU time (user + system).

    On a CPU shared with other jobs the wall clock of the same work can double from one run to the next; with ONE
    torch thread the process's CPU time is the work itself and far steadier, so CPU runs report both.
    """

    def __init__(self, names):
        self.wall: dict[str, list[float]] = {n: [] for n in names}
        self.cpu: dict[str, list[float]] = {n: [] for n in names}


def interleaved(arms: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1,
                log: Callable[[str], None] = print) -> Times:
    """Run each arm `warmup` times, then `repeats` rounds of A, B, ...; wall and CPU seconds of each timed run."""
    for _ in range(warmup):
        for name, fn in arms.items():
            t = time.perf_counter()
            fn()
            sync(device)
            log(f"  warm-up {name}: {time.perf_counter() - t:.2f} s")
    times = Times(arms)
    for r in range(repeats):
        for name, fn in arms.items():
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times.wall[name].append(time.perf_counter() - t)
            times.cpu[name].append(time.process_time() - c)
        log("  repeat %d: %s" % (r + 1, ", ".join(f"{n} {times.wall[n][-1]:.2f} s (cpu {times.cpu[n][-1]:.2f})"
                                                 for n in arms)))
    return times


def median(xs) -> float:
    return statistics.median(xs)


def ratio(times: dict[str, list[float]], a: str, b: str) -> tuple[float, float]:
    """(median(a) / median(b), median over repeats of a_i / b_i)."""
    per = [x / y for x, y in zip(times[a], times[b])]
    return median(times[a]) / median(times[b]), median(per)


def ratio_line(times: Times, a: str, b: str, target: str = "", cpu: bool = True) -> str:
    """The ratio a / b of the wall-clock medians, and (cpu=True: CPU runs) of the CPU-time medians."""
    r, rp = ratio(times.wall, a, b)
    s = f"ratio {a} / {b}: wall {r:.3f} (per-repeat median {rp:.3f})"
    if cpu:
        c, cp = ratio(times.cpu, a, b)
        s += f", cpu time {c:.3f} (per-repeat median {cp:.3f})"
    return s + (f"; target {target}" if target else "")


def table(times: Times, cpu: bool = True) -> str:
    lines = []
    for n in times.wall:
        line = f"  {n:14s} wall median {median(times.wall[n]):8.3f} s ({', '.join(f'{x:.2f}' for x in times.wall[n])})"
        if cpu:
            line += f"   cpu median {median(times.cpu[n]):8.3f} s"
        lines.append(line)
    return "\n".join(lines)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def real_tokens(batches) -> int:
    """Non-padding tokens in nested micro-batches of Encoded rows."""
    return sum(len(x.input_ids) for step in batches for mb in step for x in mb)


def padded_tokens(batches) -> int:
    return sum(len(mb) * max(len(x.input_ids) for x in mb) for step in batches for mb in step)


def plain_loop(am, params: list, batches, *, lr: float, max_grad_norm, pad_id: int, full_vocab: bool = True,
               fused: bool = False, sync_each: bool = False) -> None:
    """A plain PEFT training loop over `batches` (steps of micro-batches): one AdamW, the loss, clipping, nothing else.

    The caller makes `params` trainable. full_vocab: `model(**batch, labels=labels).loss` (logits at every
    position) instead of the project's response-only head; fused: the project's AdamW implementation instead of
    torch's default; sync_each: read the loss on the host after every micro-batch, as the loop did before the
    performance work.
    """
    from fedlora.training import _adamw_impl, collate, response_loss

    opt = torch.optim.AdamW(params, lr=lr, **(_adamw_impl({"all": params}) if fused else {}))
    am.model.train()
    for step in batches:
        for mb in step:
            b = collate(mb, pad_id, am.device)
            if full_vocab:
                loss = am.model(**b).loss
            else:
                loss_sum, n = response_loss(am, b)
                loss = loss_sum / max(1, n)
            if sync_each:
                float(loss.detach())
            loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    am.model.eval()
