"""A unidirectional stack in one call (the CUDA backend's wavefront) against the same backend layer by layer,
and torch.nn, on the same weights and inputs.

    python bench/stack_vs_layers.py --device cuda --backend cuda --out-dir bench/results
    python bench/stack_vs_layers.py --device cpu --backend reference --shapes tiny    # what CI runs

For each shape (cell, T, B, I, H, layers) and pass (inference: no_grad forward; train: forward + backward)
three candidates are timed in interleaved rounds (bench/candidates.py): "stack" (the module as users get it:
one fusedrnn::stack_forward call), "layers" (the same module with its stack path switched off: one
fusedrnn::layer_forward call per layer) and "torch.nn". Under "auto" the CUDA backend's stack call itself
picks the wavefront or one persistent layer at a time (fusedrnn/cuda.py); `fusedrnn.cuda.last_scheme()`
after the stack call is recorded. Writes stack_vs_layers_<stamp>.json (device, versions, commit, rows)
and prints a table. Timings are data, never asserted.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

import fusedrnn
from bench import candidates as compare
from bench.measure import book_shape, fused_twin, torch_rnn
from bench.provenance import provenance
from bench.timing import Schedule
from fusedrnn import modules

SHAPES = {  # name -> [(cell, T, B, I, H, layers)]
    "gpu": [
        book_shape("lstm"),
        book_shape("gru"),
        ("lstm", 256, 8, 256, 512, 2),
        ("lstm", 35, 32, 1024, 1024, 2),  # float32: the wavefront does not fit on chip, one layer does
        ("rnn_tanh", 256, 1, 128, 128, 4),
    ],
    "tiny": compare.TINY,
}
SCHEDULES = {"gpu": Schedule(warmup=3, min_repeats=10, max_repeats=50, budget_s=0.5),
             "tiny": compare.TINY_SCHEDULE}
RATIOS = [("stack vs layers", "layers", "stack"), ("stack vs torch.nn", "torch.nn", "stack")]


class ByLayers(torch.nn.Module):
    """model with the stack path switched off: one fusedrnn::layer_forward call per layer (the backward follows
    the forward's ops)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with mock.patch.object(modules.backends, "runs_stacks", lambda name: False):
            return self.model(x)


def candidates(cell, inp, hidden, layers, backend, device):
    """{"stack", "layers", "torch.nn"} -> model (bench/candidates.py), all on the same weights."""
    base = compare.Head(torch_rnn(cell, inp, hidden, layers, device=device))
    fused = fused_twin(base, backend)
    return {"stack": fused, "layers": ByLayers(fused), "torch.nn": base}


def stack_scheme(steps):
    """The scheme the CUDA backend's stack call picks (the wavefront or one persistent layer at a time)."""
    steps["stack"]()
    return {"stack_scheme": fusedrnn.cuda.last_scheme()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="cuda", help="a backend that runs stacks (fusedrnn.backend)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="gpu")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if not fusedrnn.backend.runs_stacks(args.backend):
        parser.error(f"backend {args.backend!r} runs no stacks; choose one of {fusedrnn.backend.STACK_BACKENDS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device")
    device = torch.device(args.device)
    torch.manual_seed(0)
    build = functools.partial(candidates, backend=args.backend, device=device)
    note = stack_scheme if args.backend == "cuda" else None
    rows = compare.measure(SHAPES[args.shapes], build, device, SCHEDULES[args.shapes], note)
    meta = {**provenance(device), "backend": args.backend}
    path = compare.write(args.out_dir, "stack_vs_layers", meta, rows)
    print(f"{meta['device']}, {args.backend}, {meta['date']}\n{compare.table(rows, RATIOS)}\n-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
