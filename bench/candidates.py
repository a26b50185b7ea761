"""A few named candidates timed against each other on the same weights and input, per shape and pass
(bench/stack_vs_layers.py, bench/deploy_speed.py): the models, the rows, the markdown table, the JSON file.

A shape is (cell, T, B, I, H, layers); a pass is "inference" (a no_grad forward) or "train" (forward + backward
of the output's sum). The candidates of a shape are timed in interleaved rounds (bench/timing.py). Timings are
data, never asserted.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

from bench.presets import PRESETS
from bench.report import markdown_table
from bench.timing import time_interleaved

SHAPE_KEYS = ("cell", "T", "B", "I", "H", "layers")
PASSES = ("inference", "train")
TINY = [("lstm", 4, 2, 3, 5, 2), ("gru", 3, 2, 3, 4, 3)]  # the smoke runs' shapes (stacks: CI runs them)
TINY_SCHEDULE = PRESETS["smoke"].schedule


class Head(torch.nn.Module):
    """An RNN's output sequence y: (T, B, H) for x: (T, B, I); a module whose forward TorchScript can call from
    Python (a scripted torch.nn RNN exposes only forward__0 / forward__1), and whose fused twin
    (measure.fused_twin) holds the fused RNN."""

    def __init__(self, rnn: torch.nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


def step(model: torch.nn.Module, x: torch.Tensor, train: bool):
    """One call of model on x: (T, B, I): forward + backward of the output's sum (train) or a no_grad forward."""

    def run():
        if train:
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)

    return run


def measure(shapes, candidates, device: torch.device, schedule, note=None) -> list[dict]:
    """One row per (shape, pass, candidate). candidates(cell, I, H, layers) -> {name: model}, all on the same
    weights, each model mapping x: (T, B, I) to a tensor; note({name: step}) -> extra fields for the shape's
    rows of a pass, asked after the timing."""
    rows = []
    for shape in shapes:
        cell, T, B, inp, hidden, layers = shape
        models = candidates(cell, inp, hidden, layers)
        x = torch.randn(T, B, inp, device=device)
        for pass_ in PASSES:
            steps = {name: step(model, x, pass_ == "train") for name, model in models.items()}
            stats = time_interleaved(steps, device, schedule)
            extra = note(steps) if note else {}
            rows += [{**dict(zip(SHAPE_KEYS, shape)), "pass": pass_, "candidate": name, "median_ms": s.median_ms,
                      "q25_ms": s.q25_ms, "q75_ms": s.q75_ms, "repeats": s.repeats, **extra}
                     for name, s in stats.items()]  # fmt: skip
    return rows


def table(rows: list[dict], ratios: list[tuple[str, str, str]]) -> str:
    """Markdown: one line per (shape, pass) with each candidate's median ms, then each ratio (label, a, b):
    a's median / b's."""
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    medians: dict[tuple, dict] = {}
    for r in rows:
        medians.setdefault(tuple(r[k] for k in (*SHAPE_KEYS, "pass")), {})[r["candidate"]] = r["median_ms"]
    header = ["cell", "T", "B", "I", "H", "L", "pass", *(f"{n} ms" for n in names), *(label for label, _, _ in ratios)]
    lines = [[*map(str, key), *(f"{ms[n]:.3f}" for n in names), *(f"{ms[a] / ms[b]:.2f}x" for _, a, b in ratios)]
             for key, ms in medians.items()]  # fmt: skip
    return "\n".join(markdown_table(header, lines))


def write(out_dir: Path, name: str, meta: dict, rows: list[dict]) -> Path:
    """out_dir/<name>_<local time>.json: {"meta": meta, "results": rows}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    return path
