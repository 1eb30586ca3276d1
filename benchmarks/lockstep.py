"""Target 6: K clients in lockstep (one batched forward/backward, fedlora.lockstep) against one after another.

Both arms run the same simulated round through the project's Simulation (`federation.lockstep` false / true):
the same clients, the same batches, the same global and local phases. Prints the round times, the speed-up
sequential / lockstep, and how far the two rounds' global states are apart (float rounding only, with
lora.dropout 0).

    .venv/bin/python benchmarks/lockstep.py                                  # CPU: 4 clients x 2 steps, 4 x 128
    .venv/bin/python benchmarks/lockstep.py --device cuda --clients 10 --steps 8 --batch-size 8 --max-length 256
"""

from __future__ import annotations

import common
from fedlora.simulation import Simulation


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--method", default="fedlora_opt", help="lora or magdir methods (fedit, fedsa, fedlora_opt, ...)")
    p.add_argument("--clients", type=int, default=4, help="K, all sampled")
    p.add_argument("--steps", type=int, default=2, help="global-phase steps per client")
    p.add_argument("--personal-steps", type=int, default=1, help="local-phase steps (methods with a local phase)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-rows", type=int, default=800)
    p.set_defaults(repeats=2)
    args = p.parse_args()
    device, dtype = common.setup(args)
    tok, base = common.load_model(args, device, dtype)
    cfg = common.bench_config(args, f"method={args.method}", f"clients={args.clients}", "fraction=1.0",
                              f"global_steps={args.steps}", f"personal_steps={args.personal_steps}",
                              f"train.batch_size={args.batch_size}", f"max_length={args.max_length}",
                              f"max_rows={args.max_rows}", "partition=iid", "lora.dropout=0.0")
    logs = []
    sim = Simulation(cfg, tok, base, common.load_data(cfg), log=logs.append)
    start = sim.state_dict()
    print(f"lockstep: {args.method}, {args.clients} clients x ({args.steps} + {args.personal_steps}) steps, batch "
          f"{args.batch_size} x <= {args.max_length}")
    print(common.describe(device, dtype))
    states = {}

    def arm(lockstep: bool):
        def run():  # round 1 from the same start every time: the same clients, batches and work
            sim.load_state_dict(start)
            cfg.federation.lockstep = lockstep
            sim.run_round(1)
            states[lockstep] = {k: v.detach().clone() for k, v in sim.server.global_state.items()}
        return run

    times = common.interleaved({"sequential": arm(False), "lockstep": arm(True)}, args.repeats, device)
    if logs:
        print("note: " + "; ".join(sorted(set(logs))))
    cpu = device.type == "cpu"
    print(common.table(times, cpu))
    print(common.ratio_line(times, "sequential", "lockstep", ">= 4 on a GPU with K = 10", cpu))
    diff = max(float((states[False][k] - states[True][k]).abs().max()) for k in states[False])
    print(f"largest difference between the two rounds' global states: {diff:.2e}")


if __name__ == "__main__":
    main()
