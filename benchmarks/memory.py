"""Target 3: memory with 1, 10 and 100 simulated clients: each extra client costs its personal state, never a model.

Each size runs in a fresh subprocess: load the base model once, build the Simulation (ONE AdapterModel, all
clients' data encoded), train one small step (so the peak includes a training step), then give every client
a personal state through the simulator's personal store (`sim.personal[cid]`, produced by the method's protocol
functions from a trained adapter state, as a round leaves it). Reported per size: resident memory after
that (RSS), the process's peak RSS, and the increment per extra client next to the adapter's and the personal
state's sizes.

    .venv/bin/python benchmarks/memory.py                                   # fedlora_opt and local_only
    .venv/bin/python benchmarks/memory.py --methods fedsa --sizes 1,10,100,1000
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys

import common
from fedlora.core import protocol
from fedlora.core.components import clone, nbytes


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so RSS shows what is held
    except OSError:
        pass


def child(args) -> None:
    device, dtype = common.setup(args)
    cfg = common.bench_config(args, f"method={args.method}", f"clients={args.clients}", "fraction=1.0",
                              "partition=iid", f"max_rows={args.max_rows}", "max_length=64", "train.batch_size=2",
                              "global_test_per_label=4", "min_test_per_client=1", "test_fraction=0.05")
    tok, base = common.load_model(args, device, dtype)
    from fedlora.simulation import Simulation

    sim = Simulation(cfg, tok, base, common.load_data(cfg), log=lambda m: None)
    m = sim.method
    # one real training step of client 0 (the working set of a step is part of the peak)
    res = sim.client.global_phase(0, 1, sim.server.shared_state(), None, sim.train_rows[0], steps=1)
    trained = sim.am.state()
    del res
    trim()
    rss_setup = common.current_rss_mib()
    g = sim.server.global_state
    for cid in range(args.clients):
        _, personal = protocol.after_global_phase(m, trained, None)
        if m.has_local_phase:
            personal = protocol.after_local_phase(m, trained, g)
        sim.personal[cid] = clone(personal)  # every client holds its own tensors
    trim()
    out = {
        "clients": args.clients, "method": args.method,
        "rss_setup_mib": rss_setup, "rss_mib": common.current_rss_mib(), "peak_mib": common.peak_rss_mib(),
        "adapter_bytes": nbytes(sim.am.init_state),
        "personal_bytes": nbytes(sim.personal[0]),
        "personal_tensors": len(sim.personal[0]),
        "model_bytes": sum(p.numel() * p.element_size() for p in base.parameters()),
    }
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="fedlora_opt,local_only")
    p.add_argument("--sizes", default="1,10,100")
    p.add_argument("--max-rows", type=int, default=3000, help="rows in all (the same for every size)")
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--method", default="fedlora_opt", help=argparse_hidden())
    p.add_argument("--clients", type=int, default=1, help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        child(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"memory: sizes {sizes}, {args.max_rows} rows in all, model {args.model}")
    print(common.describe(*common.setup(args)).split("; load")[0])
    for method in args.methods.split(","):
        rows = []
        for n in sizes:
            cmd = [sys.executable, __file__, "--child", "--method", method, "--clients", str(n), "--model", args.model,
                   "--data", args.data, "--max-rows", str(args.max_rows), "--device", args.device,
                   "--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"child failed ({method}, {n} clients):\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[0][7:]))
        r0 = rows[0]
        print(f"\n{method}: adapter {r0['adapter_bytes'] / 2**20:.3f} MiB, personal state per client "
              f"{r0['personal_bytes'] / 2**20:.3f} MiB in {r0['personal_tensors']} tensors, base model "
              f"{r0['model_bytes'] / 2**20:.0f} MiB")
        print(f"{'clients':>8} {'RSS before states':>18} {'RSS with states':>16} {'peak RSS':>9} "
              f"{'states/client':>14} {'total/extra client':>19} {'(/ personal)':>12}")
        for r in rows:
            held = (r["rss_mib"] - r["rss_setup_mib"]) / r["clients"] * 1024
            if r["clients"] > r0["clients"]:
                inc = (r["rss_mib"] - r0["rss_mib"]) / (r["clients"] - r0["clients"]) * 1024
                total = f"{inc:15.1f} KiB"
                vs = f"{inc * 1024 / r0['personal_bytes']:11.2f}x" if r0["personal_bytes"] else f"{'-':>12}"
            else:
                total, vs = f"{'-':>19}", f"{'-':>12}"
            print(f"{r['clients']:8d} {r['rss_setup_mib']:14.0f} MiB {r['rss_mib']:12.0f} MiB "
                  f"{r['peak_mib']:5.0f} MiB {held:10.1f} KiB {total} {vs}")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
