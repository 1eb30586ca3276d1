"""Target 4: bytes uploaded per client-round, per method, from the tensors actually sent.

Each method runs one round of the project's Simulation (SmolLM2 by default, a tiny step per client) with the
server's `aggregate` wrapped to record the uploads as they arrive; the bytes are those tensors' bytes. The
ratio FedLoRA-Optimizer / FedIT is printed, and the FedLoRA-Optimizer variants that the method's options
offer, including 16-bit transfer (`federation.transfer_dtype`), measured for FedIT too.

    .venv/bin/python benchmarks/communication.py
    .venv/bin/python benchmarks/communication.py --methods fedit,fedlora_opt --targets q_proj,v_proj
"""

from __future__ import annotations

from collections import Counter

import common
from fedlora.core.components import component_of, nbytes, numel
from fedlora.core.methods import METHODS
from fedlora.simulation import Simulation

VARIANTS = {
    "fedlora_opt": [],
    "fedlora_opt freeze_a_mag": ["method_options.freeze_a_mag=true"],
    "fedlora_opt share_b_mag": ["method_options.share_b_mag=true"],
    "fedlora_opt share_b_dir=false": ["method_options.share_b_dir=false"],
    "fedlora_opt transfer_dtype=bfloat16": ["federation.transfer_dtype=bfloat16"],
    "fedit transfer_dtype=bfloat16": ["federation.transfer_dtype=bfloat16"],
}


def one_round(args, tok, base, method: str, extra: list[str]):
    targets = "[" + ",".join(args.targets.split(",")) + "]"
    cfg = common.bench_config(args, f"method={method}", "clients=2", "fraction=1.0", "rounds=1", "global_steps=1",
                              "personal_steps=1", "train.batch_size=1", "max_length=32", "max_rows=200",
                              "partition=iid", f"lora.target_modules={targets}", *extra)
    sim = Simulation(cfg, tok, base, common.load_data(cfg), log=lambda m: None)
    sent = []
    real = sim.server.aggregate

    def spy(updates):
        sent.extend(updates)
        return real(updates)

    sim.server.aggregate = spy
    rec = sim.run_round(1)
    down = sim.server.shared_state()
    adapter = sim.am.init_state
    base = sim.am.release()
    return sent, rec, down, adapter, base


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "centralized"))
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.set_defaults(repeats=1)
    args = p.parse_args()
    device, dtype = common.setup(args)
    tok, base = common.load_model(args, device, dtype)
    print(f"communication: model {args.model}, LoRA r=8 on {args.targets}; one round, 2 clients")
    runs = {}
    names = [m for m in args.methods.split(",")]
    if "fedlora_opt" in names:
        names += [v for v in VARIANTS if v != "fedlora_opt" and v.split(" ")[0] in names]
    for name in names:
        method, extra = name.split(" ")[0], VARIANTS.get(name, [])
        sent, rec, down, adapter, base = one_round(args, tok, base, method, extra)
        runs[name] = (sent, rec, down, adapter)
    fedit = runs["fedit"][1].bytes_up if "fedit" in runs else None
    adapter_bytes = nbytes(runs["fedit"][3]) if "fedit" in runs else 0
    print(f"\n{'method':36s} {'up B/client-round':>18} {'params':>9} {'/ FedIT':>8} {'down B':>10}  what travels up")
    for name, (sent, rec, down, adapter) in runs.items():
        per = [nbytes(u.state) for u in sent]
        assert not per or all(x == per[0] for x in per)
        up = per[0] if per else 0
        assert up == rec.bytes_up or not sent
        comps = Counter()
        if sent:
            for k, v in sent[0].state.items():
                comps[component_of(k)] += v.numel()
        what = ", ".join(f"{c} ({n:,})" for c, n in comps.items()) or "nothing"
        ratio = f"{up / fedit:8.3f}" if fedit else f"{'-':>8}"
        params = numel(sent[0].state) if sent else 0
        print(f"{name:36s} {up:18,d} {params:9,d} {ratio} {nbytes(down):10,d}  {what}")
    if fedit and "fedlora_opt" in runs:
        r = runs["fedlora_opt"][1].bytes_up / fedit
        print(f"\nFedLoRA-Optimizer / FedIT = {r:.3f} (target <= 0.55), both float32; adapter "
              f"{adapter_bytes:,} B for FedIT's LoRA")
        half = "fedlora_opt transfer_dtype=bfloat16", "fedit transfer_dtype=bfloat16"
        if all(h in runs for h in half):
            a, b = (runs[h][1].bytes_up for h in half)
            print(f"both with transfer_dtype=bfloat16: {a / b:.3f}; FedLoRA-Optimizer bfloat16 / FedIT float32: "
                  f"{a / fedit:.3f}")
        only_a = "fedlora_opt share_b_dir=false"
        if only_a in runs:
            print(f"with share_b_dir=false (only A travels): {runs[only_a][1].bytes_up / fedit:.3f}, both float32")

if __name__ == "__main__":
    main()
