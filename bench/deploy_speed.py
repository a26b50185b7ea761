"""Speed of a scripted fused model on the CPU against the same model eager (fused) and with torch.nn.

    python bench/deploy_speed.py                 # writes bench/results/deploy_speed_<stamp>.json
    python bench/deploy_speed.py --shapes tiny   # seconds, a smoke run

torch.jit.script runs torch.nn's kernels for a fused module (fusedrnn/deploy.py says why), so "scripted"
should time like "torch.nn"; "fused" is the eager module as trained. For each shape (cell, T, B, I, H, layers)
and pass (inference: no_grad forward; train: forward + backward) the three candidates, on the same weights and
input, are timed in interleaved rounds (bench/candidates.py). Timings are data, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from bench import candidates as compare
from bench.measure import book_shape, fused_twin, torch_rnn
from bench.provenance import provenance
from bench.timing import Schedule

SHAPES = {  # name -> [(cell, T, B, I, H, layers)]
    "cpu": [
        book_shape("lstm"),
        book_shape("gru"),
        book_shape("rnn_tanh"),
        ("lstm", 1, 1, 8, 16, 1),  # per-call overhead
        ("lstm", 100, 8, 64, 128, 1),
    ],
    "tiny": compare.TINY,
}
SCHEDULES = {"cpu": Schedule(warmup=3, min_repeats=20, max_repeats=200, budget_s=1.0),
             "tiny": compare.TINY_SCHEDULE}
RATIOS = [("scripted / torch.nn", "scripted", "torch.nn"), ("scripted / fused", "scripted", "fused")]


def candidates(cell, inp, hidden, layers):
    """{"torch.nn", "fused", "scripted"} -> model (bench/candidates.py), all on the same weights."""
    plain = compare.Head(torch_rnn(cell, inp, hidden, layers))
    fused = fused_twin(plain, "auto")
    return {"torch.nn": plain, "fused": fused, "scripted": torch.jit.script(copy.deepcopy(fused))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    torch.manual_seed(0)
    rows = compare.measure(SHAPES[args.shapes], candidates, device, SCHEDULES[args.shapes])
    meta = {**provenance(device), "threads": torch.get_num_threads()}
    path = compare.write(args.out_dir, "deploy_speed", meta, rows)
    print(f"{meta['device']}, {meta['threads']} threads, {meta['date']}\n{compare.table(rows, RATIOS)}\n-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
