"""Profile the cpp backend against torch.nn on the CPU: where the time goes, and the measured ratios.

    python bench/cpu_profile.py                     # book model (T=35 B=32 I=28 H=256, 2 layers), all cells
    python bench/cpu_profile.py --cells lstm --repeats 60 --json bench/results/cpp_book.json

Interleaved timing of fwd+bwd training steps (bench/timing.py: rounds rotate the order), same
weights and inputs; optionally a torch.profiler breakdown of one cpp step, and the op layer's own overhead
(fusedrnn.ops.layer_forward vs calling the backend directly). Prints a table; --json writes the numbers
with the machine, versions and commit.

--clock thread times with the CPU time of the calling thread (time.thread_time) and runs one torch
thread: on a shared, overloaded machine wall-clock medians mostly measure how often the process was
descheduled, while CPU time counts only the work. --clock wall (default) is what a user sees.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from bench.measure import book_shape, fused_twin, torch_rnn
from bench.provenance import provenance
from bench.timing import HostClock, Schedule, time_interleaved
from fusedrnn import cpp
from fusedrnn.cells import LayerWeights


def models(cell, shape, dtype):
    """(torch.nn model, fusedrnn cpp model) with the same weights. shape = (T, B, I, H, L)."""
    _, _, inp, hidden, layers = shape
    base = torch_rnn(cell, inp, hidden, layers, dtype=dtype)
    return base, fused_twin(base, "cpp")


def train_step(model, x, grad):
    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x)[0].backward(grad)

    return step


CLOCKS = {"wall": time.perf_counter_ns, "thread": time.thread_time_ns}


def profile_breakdown(model, step):
    """Self CPU time per op name over one step (ms), largest first."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in rows[:8]]


def op_overhead_us(dtype, repeats=200):
    """Median us of fusedrnn.ops.layer_forward minus the backend's forward (interleaved), on a tiny rnn_tanh layer:
    x: (2, 1, 4), h0: (1, 4), W_ih, W_hh: (4, 4), no biases. Returns (overhead, the backend call alone)."""
    from fusedrnn import ops

    x, h0 = torch.randn(2, 1, 4, dtype=dtype), torch.randn(1, 4, dtype=dtype)
    weights = LayerWeights(torch.randn(4, 4, dtype=dtype), torch.randn(4, 4, dtype=dtype))
    calls = {"direct": lambda: cpp.forward("rnn_tanh", x, h0, None, weights, None, False),
             "op": lambda: ops.layer_forward(x, h0, None, *weights, None, "rnn_tanh", False, "cpp")}  # fmt: skip
    schedule = Schedule(warmup=20, min_repeats=repeats, max_repeats=repeats, budget_s=0.0)
    us = {name: s.median_ms * 1e3 for name, s in time_interleaved(calls, torch.device("cpu"), schedule).items()}
    return us["op"] - us["direct"], us["direct"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="lstm,gru,rnn_tanh")
    parser.add_argument("--shape", default=",".join(map(str, book_shape()[1:])), help="T,B,I,H,layers")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler breakdown")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    T, B, I, H, L = shape
    dtype = torch.float32
    if args.clock == "thread":
        torch.set_num_threads(1)
    results = []
    for cell in args.cells.split(","):
        base, fused = models(cell, shape, dtype)
        x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
        grad = torch.randn(T, B, H, dtype=dtype)
        cases = {"torch.nn": train_step(base, x, grad), "cpp": train_step(fused, x, grad)}
        schedule = Schedule(warmup=3, min_repeats=args.repeats, max_repeats=args.repeats, budget_s=0.0)
        stats = time_interleaved(cases, torch.device("cpu"), schedule, HostClock(CLOCKS[args.clock]))
        ratio = stats["torch.nn"].median_ms / stats["cpp"].median_ms
        row = {"cell": cell, "shape": shape, "torch_nn_ms": stats["torch.nn"].median_ms,
               "cpp_ms": stats["cpp"].median_ms, "speedup": ratio,
               "iqr_ms": {k: (s.q25_ms, s.q75_ms) for k, s in stats.items()}}  # fmt: skip
        print(f"{cell:9s} T={T} B={B} I={I} H={H} L={L}  torch.nn {row['torch_nn_ms']:7.2f} ms  "
              f"cpp {row['cpp_ms']:7.2f} ms  speed-up {ratio:.2f}x")  # fmt: skip
        if args.profile:
            for name, ms, count in profile_breakdown(fused, cases["cpp"]):
                print(f"    {name:45s} {ms:8.2f} ms  x{count}")
        results.append(row)
    overhead, direct = op_overhead_us(dtype)
    print(f"op layer overhead per layer_forward call: {overhead:.1f} us (backend call alone {direct:.1f} us)")
    if args.json:
        meta = {**provenance(torch.device("cpu")), "timer": f"host {CLOCKS[args.clock].__name__}",
                "clock": args.clock, "threads": torch.get_num_threads(),
                "op_overhead_us": overhead}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
