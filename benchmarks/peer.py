"""Target 2: the project's federated loop against a re-creation of OpenFedLLM's loop, on identical work.

The peer loop is re-created from its description (no code copied), with its defaults:
  * per client per round a fresh trainer-like object (`PeerTrainer`: a fresh DataLoader and a fresh AdamW,
    fused as the Hugging Face Trainer picks with torch >= 2.8, a linear schedule, gradient clipping at 1.0),
  * the global adapter loaded with `set_peft_model_state_dict`, the trained one taken with
    `copy.deepcopy(get_peft_model_state_dict(model))`,
  * key-by-key example-weighted averaging of the clients' dicts on the server,
  * gradient checkpointing ON, LoRA on q_proj/v_proj, the model's own full-vocabulary logits loss.
Identical work: the same base model, the same LoRA (r, alpha, dropout, targets: q/v unless --targets), and
every client-round's batches are exactly those the project's client draws (the peer's DataLoader iterates them
in order). Both sides run on their own copy of the base model.

    .venv/bin/python benchmarks/peer.py              # CPU, SmolLM2, 2 clients x 5 steps x 2 rounds, 4 x 128
    .venv/bin/python benchmarks/peer.py --plain      # also the plain PEFT loops with / without checkpointing
    .venv/bin/python benchmarks/peer.py --device cuda --batch-size 8 --max-length 256
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.data import DataLoader

import common
from fedlora.client import GLOBAL_PHASE
from fedlora.data.prompts import IGNORE
from fedlora.simulation import Simulation
from fedlora.training import phase_rng, sample_batches


def pad_collate(rows, pad_id: int) -> dict[str, torch.Tensor]:
    """What a completion-only LM collator yields: right-padded ids, prompt and padding labels ignored."""
    ids = [torch.tensor(r.input_ids) for r in rows]
    labels = [torch.tensor(r.labels) for r in rows]
    return {
        "input_ids": torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id),
        "labels": torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE),
        "attention_mask": torch.nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in ids], batch_first=True),
    }


class PeerTrainer:
    """A fresh trainer for one client and one round: its own data loader, optimizer and schedule."""

    def __init__(self, model, rows, *, batch_size: int, max_steps: int, lr: float, pad_id: int, device):
        self.model, self.max_steps, self.device = model, max_steps, device
        self.loader = DataLoader(rows, batch_size=batch_size, shuffle=False,
                                 collate_fn=lambda rs: pad_collate(rs, pad_id))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 - s / max_steps)

    def train(self) -> float:
        self.model.train()
        total = torch.zeros((), device=self.device)
        step = 0
        for batch in self.loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss = self.model(**batch).loss  # full-vocabulary logits at every position
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            total += loss.detach()
            step += 1
            if step >= self.max_steps:
                break
        return float(total) / max(1, step)


def peer_model(base, lora):
    model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    return model


def peer_federation(model, client_batches: dict, rounds: int, clients: int, *, batch_size, steps, lr, pad_id,
                    device) -> dict:
    """OpenFedLLM's round structure; `client_batches[(rnd, cid)]` are the micro-batches of that client-round."""
    global_dict = copy.deepcopy(get_peft_model_state_dict(model))
    for rnd in range(1, rounds + 1):
        local_dicts, sizes = [], []
        for cid in range(clients):
            set_peft_model_state_dict(model, global_dict)
            rows = [r for step in client_batches[(rnd, cid)] for mb in step for r in mb]
            trainer = PeerTrainer(model, rows, batch_size=batch_size, max_steps=steps, lr=lr, pad_id=pad_id,
                                  device=device)
            trainer.train()
            local_dicts.append(copy.deepcopy(get_peft_model_state_dict(model)))
            sizes.append(len(rows))
        total = sum(sizes)
        for key in global_dict:
            global_dict[key] = sum(d[key] * n / total for d, n in zip(local_dicts, sizes))
    set_peft_model_state_dict(model, global_dict)
    return global_dict


def plain_loop(model, client_batches: dict, *, lr, pad_id, device) -> None:
    """One PEFT model, one AdamW over all the same batches: no federation at all."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=True)
    model.train()
    for key in sorted(client_batches):
        for step in client_batches[key]:
            for mb in step:
                batch = {k: v.to(device) for k, v in pad_collate(mb, pad_id).items()}
                model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules of BOTH sides (peer default)")
    p.add_argument("--plain", action="store_true", help="also time plain PEFT loops with and without checkpointing")
    p.set_defaults(repeats=2)
    args = p.parse_args()
    device, dtype = common.setup(args)
    targets = "[" + ",".join(args.targets.split(",")) + "]"
    cfg = common.bench_config(args, "method=fedit", f"clients={args.clients}", "fraction=1.0",
                              f"rounds={args.rounds}", f"global_steps={args.steps}", "personal_steps=0",
                              f"train.batch_size={args.batch_size}", f"max_length={args.max_length}",
                              "max_rows=600", "partition=iid", f"lora.target_modules={targets}")
    tok, base = common.load_model(args, device, dtype)
    data = common.load_data(cfg)
    sim = Simulation(cfg, tok, base, data, log=lambda m: None)
    t, pad = cfg.train, tok.pad_token_id
    client_batches = {}
    for rnd in range(1, args.rounds + 1):
        for cid in range(args.clients):
            rows = sim.train_rows[cid]
            client_batches[(rnd, cid)] = sample_batches(rows, args.steps, t.batch_size, t.grad_accum,
                                                        phase_rng(*sim.client._seed(cid, rnd, GLOBAL_PHASE)))
    everything = [s for b in client_batches.values() for s in b]
    print(f"peer: {args.clients} clients x {args.steps} steps x {args.rounds} rounds, batch {args.batch_size} x <= "
          f"{args.max_length}, LoRA r={cfg.lora.r} on {args.targets} ({common.real_tokens(everything)} real tokens, "
          f"{common.padded_tokens(everything)} with padding)")
    print(common.describe(device, dtype))

    _, base2 = common.load_model(args, device, dtype)
    peer = peer_model(base2, cfg.lora)
    peer.gradient_checkpointing_enable()  # the peer's default (use_reentrant=False, input grads enabled)
    init = copy.deepcopy(get_peft_model_state_dict(peer))

    def project():
        for rnd in range(1, args.rounds + 1):
            sim.run_round(rnd)

    def openfedllm():
        set_peft_model_state_dict(peer, init)
        peer_federation(peer, client_batches, args.rounds, args.clients, batch_size=args.batch_size,
                        steps=args.steps, lr=t.lr, pad_id=pad, device=device)

    arms = {"project": project, "peer": openfedllm}
    if args.plain:
        _, base3 = common.load_model(args, device, dtype)
        plain = peer_model(base3, cfg.lora)

        def plain_ckpt():
            plain.gradient_checkpointing_enable()
            plain_loop(plain, client_batches, lr=t.lr, pad_id=pad, device=device)

        def plain_nockpt():
            plain.gradient_checkpointing_disable()
            plain_loop(plain, client_batches, lr=t.lr, pad_id=pad, device=device)

        arms.update({"plain-ckpt": plain_ckpt, "plain": plain_nockpt})

    # warm-up: one client-round of each side (not the whole arm: a full warm-up would double the run time)
    one = {(1, 0): client_batches[(1, 0)]}
    sim.client.global_phase(0, 1, sim.server.shared_state(), None, sim.train_rows[0], steps=1)
    peer_federation(peer, {(1, 0): one[(1, 0)][:1]}, 1, 1, batch_size=args.batch_size, steps=1, lr=t.lr,
                    pad_id=pad, device=device)
    set_peft_model_state_dict(peer, init)
    times = common.interleaved(arms, args.repeats, device, warmup=0)
    cpu = device.type == "cpu"
    print(common.table(times, cpu))
    print(common.ratio_line(times, "project", "peer", "<= 0.7 on CPU, <= 0.5 on GPU", cpu))
    if args.plain:
        print(common.ratio_line(times, "peer", "plain-ckpt", "", cpu))
        print(common.ratio_line(times, "plain", "plain-ckpt", "", cpu))
        print(common.ratio_line(times, "project", "plain", "", cpu))

if __name__ == "__main__":
    main()
