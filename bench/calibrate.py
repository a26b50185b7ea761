"""Measure the planner's constants (fusedrnn/planner.py CONSTANTS) and check its choices on one GPU, in <= 90 s.

    python bench/calibrate.py --out-dir DIR          # a stage of bench/gpu_check.sh
    python bench/calibrate.py --predict H100         # the model's predictions (bench/results/cuda_floor.md)

Writes DIR/calibrate_<stamp>.jsonl, one JSON row per measurement as it is taken (the first row: device, versions,
commit, date), so a run cut short keeps what it measured. Then prints the constants to put back in
fusedrnn/planner.py and a table: per grid point, each scheme's measured and predicted forward time, the fastest
measured and the planner's pick with the old and the new constants. Exits with a message without a CUDA device.

What is measured (CUDA events after a synchronize, medians of interleaved rounds, bench/timing.py):
  l2_gbps          a 16 MiB device-to-device copy (bytes read + written over time; fits in L2)
  gemm_efficiency  a bf16 (256 x 1024) x (1024 x 4096) GEMM replayed in a CUDA graph, against the model's rate
  launch_us, gemm_call_us, grid_barrier_us, triton_step_us, triton_launch_us
                   per step of each scheme (and both Triton variants) on a tiny LSTM (B=1, H=32, T=256), where
                   the step's work is nil
                   (grid_barrier_us keeps step_latency_us as it is: only their sum is measured)
  fma_efficiency   per step of persistent at the grid point with the most FMA work that fits on chip
The grid: LSTM, T=64, H in {256, 1024}, float32 and bfloat16, one layer, B = 1 and 256 and the batch sizes either
side of each crossover the planner predicts on this device (crossover_grid); forward without saving (the planner
decides from the forward; every scheme's backward is its mirror).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from bench.measure import book_shape
from bench.provenance import provenance
from bench.timing import Schedule, time_interleaved
from fusedrnn import planner
from fusedrnn.cells import CELLS, LayerWeights

SCHEDULE = Schedule(warmup=2, min_repeats=5, max_repeats=30, budget_s=0.15)
TINY = ("lstm", 256, 1, 32, 32, "float32")  # cell, T, B, I, H, dtype: a step with no work in it
CORNER_B = (1, 256)  # always measured; the batch sizes between come from the predicted crossovers
SCAN_B = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TRITON_POINTS = {("float32", 1, 1024), ("bfloat16", 1, 256)}  # Triton compiles per shape: a few points only
DEADLINE_S = 80.0  # stop measuring grid points past this (the stage's limit is 90 s)


class Log:
    """Appends one JSON row per measurement to a .jsonl file, flushed as it goes."""

    def __init__(self, path):
        self.path = path
        self.file = path.open("w")

    def row(self, **row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        return row


def _median_ms(fns, device):
    return {name: stats.median_ms for name, stats in time_interleaved(fns, device, SCHEDULE).items()}


def _layer_inputs(cell, T, B, I, H, dtype, device):
    """A backend forward's arguments after the cell: x: (T, B, I), h0: (B, H), c0: (B, H) or None, LayerWeights
    (W_ih: (G*H, I), W_hh: (G*H, H), both biases, no projection), lengths None, reverse False."""
    G = CELLS[cell].gates
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x, h0 = rand(T, B, I), rand(B, H)
    c0 = rand(B, H) if CELLS[cell].has_c else None
    weights = LayerWeights(rand(G * H, I, scale=I**-0.5), rand(G * H, H, scale=H**-0.5), rand(G * H), rand(G * H))
    return x, h0, c0, weights, None, False


def _switched(switch, value, forward, cell, inputs):
    """A no_grad forward of one layer with switch = (module, attribute) set to value first: a scheme or variant."""
    module, attribute = switch

    def call():
        setattr(module, attribute, value)
        with torch.no_grad():
            forward(cell, *inputs, save=False)

    return call


def _forward_fns(cell, T, B, I, H, dtype, device, with_triton):
    """{scheme: forward call} for every scheme that can run this shape (persistent only where it fits)."""
    from fusedrnn import cuda

    inputs = _layer_inputs(cell, T, B, I, H, dtype, device)
    fns = {s: _switched((cuda, "SCHEME"), s, cuda.forward, cell, inputs) for s in planner.SCHEMES}
    if not cuda._fits_on_chip(cell, dtype, device, H, H, 1, False, False):
        del fns["persistent"]
    if with_triton:
        from fusedrnn import triton as triton_backend
        from fusedrnn.triton import common

        fns.update({name: _switched((common, "VARIANT"), variant, triton_backend.forward, cell, inputs)
                    for name, variant in planner.TRITON_VARIANTS.items()})  # fmt: skip
    return fns


def measure_primitives(log, device, dev):
    """The chip's L2 bandwidth and the tensor cores' GEMM efficiency (rows "l2_copy", "gemm_graph")."""
    n = 4 * 2**20  # 16 MiB of float32: read and written inside a 50 MiB L2
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    ms = _median_ms({"copy": lambda: dst.copy_(src)}, device)["copy"]
    l2 = log.row(kind="l2_copy", bytes=8 * n, median_ms=ms, gbps=8 * n / ms / 1e6)
    a = torch.randn(256, 1024, device=device, dtype=torch.bfloat16)
    b = torch.randn(1024, 4096, device=device, dtype=torch.bfloat16)
    out = torch.empty(256, 4096, device=device, dtype=torch.bfloat16)
    reps = 20
    torch.mm(a, b, out=out)  # cuBLAS handle and workspace before capture
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            torch.mm(a, b, out=out)
    per_mm_us = _median_ms({"gemm": graph.replay}, device)["gemm"] * 1e3 / reps
    flops = 2 * 256 * 1024 * 4096
    tiles = (256 // 64) * (4096 // 128)
    peak = dev.flops_per_us("half") * min(1.0, tiles / dev.sms)
    gemm = log.row(kind="gemm_graph", shape=[256, 1024, 4096], dtype="bfloat16", per_mm_us=per_mm_us,
                   efficiency=flops / (peak * per_mm_us))
    return l2, gemm


def crossover_grid(dev, T=64, hidden=(256, 1024), dtypes=("float32", "bfloat16")):
    """The grid to measure: per (dtype, H), the corner batch sizes and the two either side of every batch size
    where the planner's pick among the CUDA schemes changes (SCAN_B), as (cell, T, B, I, H, dtype) rows."""
    grid = []
    for dtype_name in dtypes:
        for H in hidden:
            picks = [planner.plan(planner.Shape.of("lstm", T, B, H, H, H, 1, getattr(torch, dtype_name)), dev,
                                  backends=("cuda",)).scheme for B in SCAN_B]
            near = {SCAN_B[k + d] for k in range(len(SCAN_B) - 1) if picks[k] != picks[k + 1] for d in (0, 1)}
            grid += [("lstm", T, B, H, H, dtype_name) for B in sorted(near | set(CORNER_B))]
    return grid


def measure_point(log, device, dev, cell, T, B, I, H, dtype_name, with_triton):
    """Each scheme's forward at one shape, with the planner's predictions (row "point")."""
    dtype = getattr(torch, dtype_name)
    measured = _median_ms(_forward_fns(cell, T, B, I, H, dtype, device, with_triton), device)
    shape = planner.Shape.of(cell, T, B, I, H, H, 1, dtype)
    predicted = {s: T * planner.step_us(s, shape, dev) / 1e3 for s in measured}
    return log.row(kind="point", cell=cell, T=T, B=B, I=I, H=H, dtype=dtype_name, measured_ms=measured,
                   predicted_ms=predicted, planner_pick=min(predicted, key=predicted.get),
                   fastest=min(measured, key=measured.get))


def fit_constants(tiny, points, l2, gemm, dev):
    """New values for planner.CONSTANTS from the measurements (rows as Log wrote them); what is not measured
    keeps its value. tiny: the "point" row of TINY."""
    c = dict(planner.CONSTANTS)
    per_step = {s: ms * 1e3 / tiny["T"] for s, ms in tiny["measured_ms"].items()}
    c["l2_gbps"] = round(l2["gbps"], 0)
    c["gemm_efficiency"] = round(min(1.0, gemm["efficiency"]), 3)
    c["launch_us"] = round(per_step["per_step"], 2)
    c["gemm_call_us"] = round(max(per_step["gemm"] - c["launch_us"], 0.1), 2)
    if "persistent" in per_step:
        c["grid_barrier_us"] = round(max(per_step["persistent"] - c["step_latency_us"], 0.1), 2)
    if "triton" in per_step:
        c["triton_step_us"] = round(per_step["triton"], 2)
        c["triton_launch_us"] = round(per_step["triton_split"], 2)  # one phase per forward step here
    fits = [p for p in points if "persistent" in p["measured_ms"] and p["dtype"] == "float32"]
    if fits:  # the point where the FMA work dominates the step most
        p = max(fits, key=lambda p: p["B"] * p["H"] ** 2)
        shape = planner.Shape.of(p["cell"], p["T"], p["B"], p["I"], p["H"], p["H"], 1, torch.float32)
        work_us = p["measured_ms"]["persistent"] * 1e3 / p["T"] - c["grid_barrier_us"] - c["step_latency_us"]
        if work_us > 0:
            c["fma_efficiency"] = round(2 * shape.macs / (dev.flops_per_us("fp32") * work_us), 3)
    return c


def table(points, constants, dev):
    """The grid as text: measured ms per scheme, fastest, the planner's pick with old and new constants."""
    lines = ["cell dtype      B     H | measured forward ms per scheme            | fastest    | pick (old -> new)"]
    for p in points:
        shape = planner.Shape.of(p["cell"], p["T"], p["B"], p["I"], p["H"], p["H"], 1, getattr(torch, p["dtype"]))
        old = p["planner_pick"]
        saved = dict(planner.CONSTANTS)
        planner.CONSTANTS.update(constants)
        try:
            new = min(p["measured_ms"], key=lambda s: planner.step_us(s, shape, dev))
        finally:
            planner.CONSTANTS.update(saved)
        times = " ".join(f"{s}={ms:.3f}" for s, ms in p["measured_ms"].items())
        point = f"{p['cell']} {p['dtype']:9} {p['B']:4} {p['H']:5}"
        lines.append(f"{point} | {times:41} | {p['fastest']:10} | {old} -> {new}")
    return "\n".join(lines)


BOOK = (*book_shape(), "float32")  # cell, T, B, I, H, L, dtype
CORNERS = [("lstm", T, B, H, H, L, dt) for dt in ("float32", "bfloat16") for L in (1, 2) for T in (35, 256)
           for B in (1, 256) for H in (128, 1024)]
COLUMNS = ("persistent", "per_step", "gemm", "triton", "triton_split", "wavefront-persistent", "wavefront-per_step")


def predictions(device_name):
    """Markdown: the model's forward time (ms) of each way to run the book's model and the sweep's corner
    points on a datasheet device (planner.KNOWN_DEVICES), and the planner's pick. No GPU needed."""
    dev = planner.KNOWN_DEVICES[device_name]
    lines = [f"| cell T B I H L dtype | {' | '.join(COLUMNS)} | pick |", "|---" * (len(COLUMNS) + 2) + "|"]
    for cell, T, B, I, H, L, dtype_name in [BOOK, *CORNERS]:
        shape = planner.Shape.of(cell, T, B, I, H, H, L, getattr(torch, dtype_name))
        chosen = planner.plan(shape, dev)
        cells = [f"{chosen.predicted[c] / 1e3:.3f}" if c in chosen.predicted else "-" for c in COLUMNS]
        pick = chosen.backend if chosen.backend == "triton" else chosen.scheme + (" by layers" if chosen.by_layers else "")
        lines.append(f"| {cell} {T} {B} {I} {H} {L} {dtype_name} | {' | '.join(cells)} | {pick} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--predict", choices=sorted(planner.KNOWN_DEVICES),
                        help="print the model's predictions for a datasheet device instead (no GPU needed)")
    args = parser.parse_args(argv)
    if args.predict:
        print(predictions(args.predict))
        return 0
    if not torch.cuda.is_available():
        parser.error("calibrate.py measures a GPU and needs a CUDA device (torch.cuda.is_available() is False)")
    start = time.monotonic()
    device = torch.device("cuda", torch.cuda.current_device())
    dev = planner.Device.of(device)
    now = datetime.datetime.now().astimezone()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(args.out_dir / f"calibrate_{now:%Y%m%d-%H%M%S}.jsonl")
    meta = log.row(kind="meta", **provenance(device), sms=dev.sms, smem_per_block=dev.smem_per_block,
                   l2_bytes=dev.l2_bytes, constants=planner.CONSTANTS, allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    l2, gemm = measure_primitives(log, device, dev)
    tiny = measure_point(log, device, dev, *TINY, with_triton=True)
    points = []
    for cell, T, B, I, H, dtype_name in crossover_grid(dev):
        if time.monotonic() - start > DEADLINE_S:
            log.row(kind="skipped", cell=cell, B=B, H=H, dtype=dtype_name, reason=f"past {DEADLINE_S} s")
            continue
        with_triton = (dtype_name, B, H) in TRITON_POINTS
        points.append(measure_point(log, device, dev, cell, T, B, I, H, dtype_name, with_triton))
    constants = fit_constants(tiny, points, l2, gemm, dev)
    log.row(kind="constants", constants=constants, elapsed_s=time.monotonic() - start)
    print(f"{meta['device']}, {now:%Y-%m-%d %H:%M %Z}, {time.monotonic() - start:.0f} s -> {log.path}")
    print(table([tiny, *points], constants, dev))
    print("put back in fusedrnn/planner.py:\nCONSTANTS = " + json.dumps(constants, indent=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
