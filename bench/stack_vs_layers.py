"""A unidirectional stack in one call (the CUDA backend's wavefront) against the same backend layer by layer,
and torch.nn, on the same weights and inputs.

    python bench/stack_vs_layers.py --device cuda --backend cuda --out-dir bench/results
    python bench/stack_vs_layers.py --device cpu --backend reference --shapes tiny    # what CI runs

For each shape (cell, T, B, I, H, layers) and pass (train: forward + backward; inference: no_grad forward)
three candidates are timed in interleaved rounds (bench/timing.py): "stack" (the module as users get it:
one fusedrnn::stack_forward call), "layers" (the same module with its stack path switched off: one
fusedrnn::layer_forward call per layer) and "torch.nn". Under "auto" the CUDA backend's stack call itself
picks the wavefront or one persistent layer at a time (fusedrnn/cuda.py); `fusedrnn.cuda.last_scheme()`
after the stack call is recorded. Writes stack_vs_layers_<stamp>.json (device, versions, commit, rows)
and prints a table. Timings are data, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

import fusedrnn
from bench.provenance import device_name, git, package_version
from bench.timing import Schedule, time_interleaved
from fusedrnn import modules

SHAPES = {  # name -> [(cell, T, B, I, H, layers)]
    "gpu": [
        ("lstm", 35, 32, 28, 256, 2),  # the book's model
        ("gru", 35, 32, 28, 256, 2),
        ("lstm", 256, 8, 256, 512, 2),
        ("lstm", 35, 32, 1024, 1024, 2),  # float32: the wavefront does not fit on chip, one layer does
        ("rnn_tanh", 256, 1, 128, 128, 4),
    ],
    "tiny": [("lstm", 4, 2, 3, 5, 2), ("gru", 3, 2, 3, 4, 3)],
}
SCHEDULES = {"gpu": Schedule(warmup=3, min_repeats=10, max_repeats=50, budget_s=0.5),
             "tiny": Schedule(warmup=1, min_repeats=2, max_repeats=2, budget_s=0.0)}
CLASSES = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {"nonlinearity": "tanh"})}


def candidates(cell, shape, backend, device):
    """{"stack", "layers", "torch.nn"} -> (model, whether its stack path is switched off), same weights."""
    _, _, inp, hidden, layers = shape
    name, extra = CLASSES[cell]
    base = getattr(torch.nn, name)(inp, hidden, layers, device=device, **extra)
    fused = getattr(fusedrnn, name)(inp, hidden, layers, device=device, backend=backend, **extra)
    fused.load_state_dict(base.state_dict())
    return {"stack": (fused, False), "layers": (fused, True), "torch.nn": (base, False)}


def step(model, by_layers, x, train):
    """One call of `model`: forward + backward (train) or a no_grad forward, the stack path off if asked."""

    def run():
        off = mock.patch.object(modules.backends, "runs_stacks", lambda name: False)
        with off if by_layers else contextlib.nullcontext():
            if train:
                model.zero_grad(set_to_none=True)
                model(x)[0].sum().backward()
            else:
                with torch.no_grad():
                    model(x)

    return run


def measure(shapes, backend, device, schedule):
    rows = []
    for cell, T, B, inp, hidden, layers in shapes:
        shape = (T, B, inp, hidden, layers)
        models = candidates(cell, shape, backend, device)
        x = torch.randn(T, B, inp, device=device)
        for train in (True, False):
            fns = {name: step(m, off, x, train) for name, (m, off) in models.items()}
            stats = time_interleaved(fns, torch.device(device), schedule)
            scheme = None
            if backend == "cuda":
                fns["stack"]()
                scheme = fusedrnn.cuda.last_scheme()
            for name, s in stats.items():
                rows.append({"cell": cell, "T": T, "B": B, "I": inp, "H": hidden, "layers": layers,
                             "mode": "train" if train else "inference", "candidate": name,
                             "median_ms": s.median_ms, "q25_ms": s.q25_ms, "q75_ms": s.q75_ms,
                             "repeats": s.repeats, "stack_scheme": scheme})
    return rows


def table(rows):
    header = ["cell", "T", "B", "I", "H", "L", "pass", "stack ms", "layers ms", "torch.nn ms", "stack vs layers",
              "stack vs torch.nn"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for i in range(0, len(rows), 3):
        by = {r["candidate"]: r for r in rows[i : i + 3]}
        r, ms = by["stack"], {k: v["median_ms"] for k, v in by.items()}
        lines.append(f"| {r['cell']} | {r['T']} | {r['B']} | {r['I']} | {r['H']} | {r['layers']} | {r['mode']} | "
                     f"{ms['stack']:.3f} | {ms['layers']:.3f} | {ms['torch.nn']:.3f} | "
                     f"{ms['layers'] / ms['stack']:.2f}x | {ms['torch.nn'] / ms['stack']:.2f}x |")
    return "\n".join(lines)


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
    torch.manual_seed(0)
    rows = measure(SHAPES[args.shapes], args.backend, args.device, SCHEDULES[args.shapes])
    now = datetime.datetime.now().astimezone()
    meta = {"date": now.isoformat(timespec="seconds"), "device": device_name(torch.device(args.device)),
            "backend": args.backend, "torch": torch.__version__, "cuda": torch.version.cuda,
            "fusedrnn": package_version("fusedrnn"), "git_commit": git("rev-parse", "HEAD"),
            "timer": "CUDA events after a synchronize" if args.device == "cuda" else "host perf_counter"}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"stack_vs_layers_{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"{meta['device']}, {args.backend}, {meta['date']}\n{table(rows)}\n-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
