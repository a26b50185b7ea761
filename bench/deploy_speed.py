"""Speed of a scripted fused model on the CPU against the same model eager (fused) and with torch.nn.

    python bench/deploy_speed.py                 # writes bench/results/deploy_speed_<stamp>.json
    python bench/deploy_speed.py --shapes tiny   # seconds, a smoke run

torch.jit.script runs torch.nn's kernels for a fused module (fusedrnn/deploy.py says why), so "scripted"
should time like "torch.nn"; "fused" is the eager module as trained. For each shape (cell, T, B, I, H, layers)
and pass (inference: no_grad forward; train: forward + backward) the three candidates, on the same weights and
input, are timed in interleaved rounds (bench/timing.py). Timings are data, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

import fusedrnn
from bench.provenance import device_name, git, package_version
from bench.timing import Schedule, time_interleaved

SHAPES = {  # name -> [(cell, T, B, I, H, layers)]
    "cpu": [
        ("lstm", 35, 32, 28, 256, 2),  # the book's model
        ("gru", 35, 32, 28, 256, 2),
        ("rnn_tanh", 35, 32, 28, 256, 2),
        ("lstm", 1, 1, 8, 16, 1),  # per-call overhead
        ("lstm", 100, 8, 64, 128, 1),
    ],
    "tiny": [("lstm", 4, 2, 3, 5, 2), ("gru", 3, 2, 3, 4, 1)],
}
SCHEDULES = {"cpu": Schedule(warmup=3, min_repeats=20, max_repeats=200, budget_s=1.0),
             "tiny": Schedule(warmup=1, min_repeats=2, max_repeats=2, budget_s=0.0)}
CLASSES = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN}


class Head(torch.nn.Module):
    """The RNN's output sequence; a module whose forward TorchScript can call from Python (a scripted torch.nn
    RNN exposes only forward__0 / forward__1)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


def candidates(cell, inp, hidden, layers):
    """{"torch.nn", "fused", "scripted"} -> model, all on the same weights."""
    plain = Head(CLASSES[cell](inp, hidden, layers))
    fused = fusedrnn.convert(copy.deepcopy(plain))
    return {"torch.nn": plain, "fused": fused, "scripted": torch.jit.script(copy.deepcopy(fused))}


def step(model, x, train):
    def run():
        if train:
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)

    return run


def measure(shapes, schedule):
    rows = []
    for cell, T, B, inp, hidden, layers in shapes:
        models = candidates(cell, inp, hidden, layers)
        x = torch.randn(T, B, inp)
        for train in (False, True):
            stats = time_interleaved({n: step(m, x, train) for n, m in models.items()}, torch.device("cpu"), schedule)
            for name, s in stats.items():
                rows.append({"cell": cell, "T": T, "B": B, "I": inp, "H": hidden, "layers": layers,
                             "mode": "train" if train else "inference", "candidate": name,
                             "median_ms": s.median_ms, "q25_ms": s.q25_ms, "q75_ms": s.q75_ms, "repeats": s.repeats})
    return rows


def table(rows):
    header = ["cell", "T", "B", "I", "H", "L", "pass", "torch.nn ms", "fused ms", "scripted ms",
              "scripted / torch.nn", "scripted / fused"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for i in range(0, len(rows), 3):
        ms = {r["candidate"]: r["median_ms"] for r in rows[i : i + 3]}
        r = rows[i]
        lines.append(f"| {r['cell']} | {r['T']} | {r['B']} | {r['I']} | {r['H']} | {r['layers']} | {r['mode']} | "
                     f"{ms['torch.nn']:.3f} | {ms['fused']:.3f} | {ms['scripted']:.3f} | "
                     f"{ms['scripted'] / ms['torch.nn']:.2f}x | {ms['scripted'] / ms['fused']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = measure(SHAPES[args.shapes], SCHEDULES[args.shapes])
    now = datetime.datetime.now().astimezone()
    meta = {"date": now.isoformat(timespec="seconds"), "device": device_name(torch.device("cpu")),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "fusedrnn": package_version("fusedrnn"), "git_commit": git("rev-parse", "HEAD"),
            "timer": "host perf_counter"}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"deploy_speed_{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"{meta['device']}, {meta['threads']} threads, {meta['date']}\n{table(rows)}\n-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
