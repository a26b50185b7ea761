"""Microbenchmark: fusedrnn backends against torch.nn, on this machine, for these shapes.

    python bench/run.py                       # quick preset on CUDA if present, else the CPU
    python bench/run.py --preset full --device cpu --cells lstm,gru --batch 1,32

Every point (cell x pass x dtype x seq len x batch x hidden x layers, plus the book's model) times
torch.nn (cuDNN on CUDA, torch's own kernels on the CPU) and every fusedrnn backend for the device,
all with the same weights and the same fresh random inputs and initial states (bench/measure.py).
Passes: inference = forward under no_grad; train = forward + backward of a random output gradient,
into the weights and the input; decode = 100 forwards under no_grad, each from the state the one
before returned (text generation at T=1, streaming chunks at T > 1). A backend that is unavailable
or fails is kept as a row ("n/a: ..." / "error: ..."). Writes a table to stdout, CSV + JSON (+ PNG
chart) to bench/results/ (bench/report.py). main(argv) is the entry point for scripts (e.g. the GPU check).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/run.py` from a checkout finds bench/ and fusedrnn/

import torch

from bench.measure import BACKENDS, BASELINE, DTYPES, FUSED_BACKENDS, Config, run_sweep
from bench.presets import PASSES, PRESETS
from bench.report import RowWriter, format_table, metadata, write_summaries
from fusedrnn.cells import CELL_NAMES

RESULTS_DIR = ROOT / "bench" / "results"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `bench/run.py: error: <what>`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def listof(item, what: str):
    """A type for comma-separated values, each checked by item (a function or a tuple of choices)."""

    def parse(text: str) -> list:
        values = [v for v in text.split(",") if v]
        if not values:
            raise argparse.ArgumentTypeError(f"empty {what} list")
        if callable(item):
            return [item(v) for v in values]
        bad = [v for v in values if v not in item]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)} (choose from {', '.join(item)})")
        return values

    parse.__name__ = what  # argparse names the option's type in its messages
    return parse


def device_arg(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type not in FUSED_BACKENDS:
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda are benchmarked")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available to torch {torch.__version__}")
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def build_parser() -> Parser:
    p = Parser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    lists = "comma-separated; default from the preset"
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sweep and timing budget (default quick)")
    p.add_argument("--cells", type=listof(CELL_NAMES, "cell"), help=f"{', '.join(CELL_NAMES)} ({lists})")
    p.add_argument("--batch", type=listof(positive_int, "batch"), help=f"batch sizes ({lists})")
    p.add_argument("--hidden", type=listof(positive_int, "hidden"), help=f"hidden sizes ({lists})")
    p.add_argument("--seq-len", type=listof(positive_int, "seq-len"), help=f"sequence lengths ({lists})")
    p.add_argument("--layers", type=listof(positive_int, "layers"), help=f"layer counts ({lists})")
    p.add_argument("--input-size", type=positive_int, help="input features (default: the hidden size)")
    p.add_argument("--dtypes", type=listof(tuple(DTYPES), "dtype"), help=f"{', '.join(DTYPES)} ({lists})")
    p.add_argument("--passes", type=listof(PASSES, "pass"), help=f"{', '.join(PASSES)} ({lists})")
    p.add_argument(
        "--backends",
        type=listof(BACKENDS, "backend"),
        help="fusedrnn backends (default: all for the device); torch.nn always runs as the baseline",
    )
    p.add_argument("--device", type=device_arg, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--repeats", type=positive_int, help="timed repeats per point (default: fill the preset's budget)")
    p.add_argument("--warmup", type=positive_int, help="warm-up calls per backend and point")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default 0)")
    p.add_argument("--out-dir", type=Path, help="where result files go (default bench/results)")
    p.add_argument("--csv", type=Path, help="CSV path (default <out-dir>/<preset>_<device>_<date>.csv)")
    p.add_argument("--json", type=Path, help="JSON path (default like --csv)")
    p.add_argument("--markdown", type=Path, help="markdown summary path, for the README (default like --csv)")
    p.add_argument("--plot", type=Path, help="PNG chart path (default like --csv)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true", help="exit 1 if any backend errored (not n/a)")
    return p


def config_from(args: argparse.Namespace) -> Config:
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset]
    if device.type not in preset.sweeps:
        build_parser().error(f"preset {args.preset} has no {device.type} sweep (it has: {', '.join(preset.sweeps)})")
    sweep = preset.sweeps[device.type]
    overrides = {k: tuple(v) for k in ("cells", "batch", "hidden", "seq_len", "layers", "dtypes", "passes")
                 if (v := getattr(args, k)) is not None}  # fmt: skip
    schedule = preset.schedule
    if args.repeats:
        schedule = dataclasses.replace(schedule, min_repeats=args.repeats, max_repeats=args.repeats)
    if args.warmup:
        schedule = dataclasses.replace(schedule, warmup=args.warmup)
    fused = tuple(args.backends or preset.backends or FUSED_BACKENDS[device.type])
    backends = (BASELINE, *dict.fromkeys(b for b in fused if b != BASELINE))
    return Config(args.preset, dataclasses.replace(sweep, **overrides), args.input_size, backends, device,
                  schedule, args.seed)  # fmt: skip


def output_paths(args: argparse.Namespace, config: Config) -> dict[str, Path | None]:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    stem = (args.out_dir or RESULTS_DIR) / f"{config.preset}_{config.device.type}_{stamp}"
    return {
        "csv": args.csv or stem.with_suffix(".csv"),
        "json": args.json or stem.with_suffix(".json"),
        "markdown": args.markdown or stem.with_suffix(".md"),
        "plot": None if args.no_plot else args.plot or stem.with_suffix(".png"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # before anything runs; the device line reports it
    config = config_from(args)
    paths = output_paths(args, config)
    meta = metadata(config, argv)  # before the run: the load average is then other work's
    for path in filter(None, paths.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
    writer = RowWriter(paths["csv"], paths["json"], meta)
    rows = run_sweep(config, progress=not args.quiet, on_rows=writer.add)
    writer.close()
    print(f"{meta['device']} | torch {meta['torch']} | {meta['date']} | commit {meta['git_commit'][:12]}")
    print(format_table(rows))
    write_summaries(rows, meta, paths["markdown"], paths["plot"])
    print("wrote " + ", ".join(str(p) for p in paths.values() if p))
    errors = [r for r in rows if r.status.startswith("error")]
    return 1 if args.strict and errors else 0


if __name__ == "__main__":
    sys.exit(main())
