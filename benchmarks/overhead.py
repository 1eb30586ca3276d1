"""Target 1: federation overhead.

A simulated round (K clients x S steps through the project's Simulation / FedClient / Server: adapter swaps,
state copies, per-phase optimizers, upload selection, validation, aggregation) divided by the same K x S steps
on the same batches in a plain PEFT loop (model + AdamW + loss, nothing else). Two plain loops:

  plain-naive  model(**batch, labels=labels).loss (full-vocabulary logits), torch's default AdamW: what a user writes
  plain-same   the project's step (response-only LM head, fused AdamW) without any federation around it

round / plain-naive is the target's figure; round / plain-same is the federation machinery's own cost, and
plain-naive / plain-same the step's speed-up. A fourth arm, the round with the training steps stubbed out
(everything else of the round kept), times the machinery alone, which is far less noisy than a difference of
two noisy totals: overhead = 1 + machinery / plain-same.

    .venv/bin/python benchmarks/overhead.py                       # CPU, SmolLM2, 2 clients x 2 steps, 4 x 128
    .venv/bin/python benchmarks/overhead.py --device cuda --clients 10 --steps 8 --batch-size 8 --max-length 256
"""

from __future__ import annotations

import math

import torch

import common
from fedlora import client as client_mod
from fedlora.client import GLOBAL_PHASE, LOCAL_PHASE
from fedlora.simulation import Simulation
from fedlora.training import PhaseStats, _adamw_impl, phase_rng, sample_batches


def round_batches(sim: Simulation, rnd: int) -> list[list[list]]:
    """Every micro-batch list the round's clients train on, in order (the same draws FedClient makes)."""
    c, m, t = sim.client, sim.method, sim.cfg.train
    out = []
    for cid in range(len(sim.data.clients)):
        rows = sim.train_rows[cid]
        out += sample_batches(rows, c.steps_for(len(rows)), t.batch_size, t.grad_accum,
                              phase_rng(*c._seed(cid, rnd, GLOBAL_PHASE)))
        if m.has_local_phase and t.personal_steps:
            out += sample_batches(rows, t.personal_steps, t.batch_size, t.grad_accum,
                                  phase_rng(*c._seed(cid, rnd, LOCAL_PHASE)))
    return out





def stub_train_phase(am, batches, trainable, *, lr, train_cfg, pad_id, loss_terms=(), anchor=None, torch_seed=0):
    """train_phase without forward/backward/step: what is left of a round is the federation machinery."""
    groups = am.set_trainable(trainable)
    if groups and batches:
        torch.optim.AdamW([{"params": ps, "lr": lr * trainable[c]} for c, ps in groups.items()], lr=lr,
                          **_adamw_impl(groups))
    am.set_trainable(())
    return PhaseStats(examples=sum(len(mb) for s in batches for mb in s), steps=len(batches), loss=1.0)


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--method", default="fedit", help="any project method (fedit: plain LoRA, as a PEFT user has)")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="global-phase steps per client (S)")
    p.add_argument("--personal-steps", type=int, default=0, help="local-phase steps (methods with a local phase)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-rows", type=int, default=400)
    args = p.parse_args()
    device, dtype = common.setup(args)
    cfg = common.bench_config(args, f"method={args.method}", f"clients={args.clients}", "fraction=1.0",
                              f"global_steps={args.steps}", f"personal_steps={args.personal_steps}",
                              f"train.batch_size={args.batch_size}", f"max_length={args.max_length}",
                              f"max_rows={args.max_rows}", "partition=iid")
    tok, base = common.load_model(args, device, dtype)
    sim = Simulation(cfg, tok, base, common.load_data(cfg), log=lambda m: None)
    rnd = 1  # every repeat runs round 1 again: the same clients, the same batches
    batches = round_batches(sim, rnd)
    t = cfg.train
    n_real, n_padded = common.real_tokens(batches), common.padded_tokens(batches)
    print(f"overhead: {args.method}, {args.clients} clients x {len(batches) // args.clients} steps, batch "
          f"{args.batch_size} x <= {args.max_length} ({n_real} real tokens, {n_padded} with padding)")
    print(common.describe(device, dtype))

    def fed_round():
        sim.run_round(rnd)

    def machinery():
        real = client_mod.train_phase
        client_mod.train_phase = stub_train_phase
        try:
            sim.run_round(rnd)
        finally:
            client_mod.train_phase = real

    def plain_loop(naive: bool) -> None:
        """One model, one AdamW, the steps: nothing else."""
        params = list(sim.am.params.values())
        for p in params:
            p.requires_grad_(True)
        common.plain_loop(sim.am, params, batches, lr=t.lr, max_grad_norm=t.max_grad_norm, pad_id=tok.pad_token_id,
                          full_vocab=naive, fused=not naive)
        for p in params:
            p.requires_grad_(False)

    arms = {
        "round": fed_round,
        "plain-naive": lambda: plain_loop(naive=True),
        "plain-same": lambda: plain_loop(naive=False),
        "machinery": machinery,
    }
    times = common.interleaved(arms, args.repeats, device)
    cpu = device.type == "cpu"
    print(common.table(times, cpu))
    print(common.ratio_line(times, "round", "plain-naive", "<= 1.03", cpu))
    print(common.ratio_line(times, "round", "plain-same", "", cpu))
    print(common.ratio_line(times, "plain-naive", "plain-same", "", cpu))
    clock = times.cpu if cpu else times.wall
    mach = common.median(clock["machinery"]) / common.median(clock["plain-same"])
    print(f"machinery alone = {common.median(clock['machinery']) * 1000:.1f} ms {'cpu' if cpu else 'wall'} per round "
          f"= {mach * 100:.2f} % of plain-same; overhead estimate round / plain-same = {1 + mach:.4f}")
    if not math.isfinite(sim.history[-1].train_loss if sim.history else 0.0):
        print("warning: non-finite loss")


if __name__ == "__main__":
    main()
