"""Microbenchmark: fusedrnn backends against torch.nn, on this machine, for these shapes.

    python bench/run.py                       # quick preset on CUDA if present, else the CPU
    python bench/run.py --preset full --device cpu --cells lstm,gru --batch 1,32

Every point (cell x mode x dtype x seq len x batch x hidden x layers, plus the book's model) times
torch.nn (cuDNN on CUDA, torch's own kernels on the CPU) and every fusedrnn backend for the device,
all with the same weights (loaded from the torch.nn module) and the same fresh random inputs and
initial states. Modes: inference = forward under no_grad; train = forward + backward of a random
output gradient, into the weights and the input; decode = 100 forwards under no_grad, each from the
state the one before returned (text generation at T=1, streaming chunks at T > 1). A backend that is unavailable or fails is kept
as a row ("n/a: ..." / "error: ..."). Writes a table to stdout, CSV + JSON (+ PNG chart) to
bench/results/. main(argv) is the entry point for scripts (e.g. the GPU check).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/run.py` from a checkout finds bench/ and fusedrnn/

import torch
from tqdm import tqdm

from bench.presets import CELLS, DECODE_CALLS, MODES, PRESETS, Sweep
from bench.timing import Schedule, peak_memory_bytes, time_interleaved

BASELINE = "torch.nn"
FUSED_BACKENDS = {"cpu": ("reference", "cpp"), "cuda": ("reference", "triton", "cuda")}
BACKENDS = (BASELINE, "auto", "reference", "cpp", "triton", "cuda")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
MODULES = {  # cell -> (class name in torch.nn and fusedrnn, extra constructor arguments)
    "lstm": ("LSTM", {}),
    "gru": ("GRU", {}),
    "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
}
BOOK = {"cell": "lstm", "seq_len": 35, "batch": 32, "input_size": 28, "hidden": 256, "layers": 2}
RESULTS_DIR = ROOT / "bench" / "results"


@dataclasses.dataclass(frozen=True)
class Point:
    """One benchmark shape; x: (seq_len, batch, input_size), h: (layers, batch, hidden)."""

    cell: str
    mode: str
    dtype: str
    seq_len: int
    batch: int
    input_size: int
    hidden: int
    layers: int
    tag: str = ""

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch * (DECODE_CALLS if self.mode == "decode" else 1)

    def label(self) -> str:
        return (
            f"{self.cell} {self.mode} {self.dtype} T={self.seq_len} B={self.batch} "
            f"I={self.input_size} H={self.hidden} L={self.layers}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row(Point):
    """One backend at one point (the point's fields first). status is "ok", "n/a: <reason>" or "error: <what>"."""

    backend: str
    status: str
    ran: str | None = None  # the backend that actually ran (module.last_backend)
    median_ms: float | None = None
    q25_ms: float | None = None
    q75_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    repeats: int | None = None
    tokens_per_s: float | None = None
    speedup: float | None = None  # torch.nn median / this median
    peak_mem_mb: float | None = None
    max_diff: float | None = None  # max |output - torch.nn output| of one forward


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str
    sweep: Sweep
    input_size: int | None
    backends: tuple[str, ...]
    device: torch.device
    schedule: Schedule
    seed: int


# ----------------------------------------------------------------------------------------- points


def book_point(mode: str, dtype: str) -> Point:
    """The book's model; in decode mode as its predict_ch8 generates text: one sequence, one token per call."""
    decode = {"seq_len": 1, "batch": 1} if mode == "decode" else {}
    return Point(mode=mode, dtype=dtype, tag="book", **{**BOOK, **decode})


def sweep_points(sweep: Sweep, input_size: int | None) -> list[Point]:
    """The book's model first, then the grid (I = hidden unless given); no shape twice."""
    book = [book_point(m, d) for d in sweep.dtypes for m in sweep.modes]
    grid = [
        Point(cell, mode, dtype, t, b, input_size or h, h, layers)
        for dtype, mode, cell, layers, t, h, b in itertools.product(
            sweep.dtypes, sweep.modes, sweep.cells, sweep.layers, sweep.seq_len, sweep.hidden, sweep.batch
        )
    ]
    book_shapes = {dataclasses.replace(p, tag="") for p in book}
    return book + [p for p in grid if p not in book_shapes]


# ------------------------------------------------------------------------------------------ cases


class Inputs:
    """Fresh random tensors shared by all backends at one point (never zeros).

    x: (T, B, I), requires grad in train mode; hx: (L, B, H), a (h0, c0) pair for LSTM;
    grad_out: (T, B, H), the gradient fed to backward.
    """

    def __init__(self, point: Point, device: torch.device):
        dtype = DTYPES[point.dtype]
        shape = (point.layers, point.batch, point.hidden)
        self.x = torch.randn(point.seq_len, point.batch, point.input_size, device=device, dtype=dtype)
        self.x.requires_grad_(point.mode == "train")
        h0 = torch.randn(shape, device=device, dtype=dtype)
        self.hx = (h0, torch.randn(shape, device=device, dtype=dtype)) if point.cell == "lstm" else h0
        self.grad_out = torch.randn(point.seq_len, point.batch, point.hidden, device=device, dtype=dtype)


class Case:
    """One module on shared inputs; calling it runs one benchmark step of the point's mode."""

    def __init__(self, module: torch.nn.Module, inputs: Inputs, mode: str):
        self.module, self.inputs, self.mode = module, inputs, mode

    def __call__(self) -> torch.Tensor:
        """One step; returns the output y: (T, B, H) (decode: the last call's)."""
        if self.mode == "inference":
            with torch.no_grad():
                return self.module(self.inputs.x, self.inputs.hx)[0]
        if self.mode == "decode":
            return self.decode()
        self.drop_grads()
        out, _ = self.module(self.inputs.x, self.inputs.hx)
        out.backward(self.inputs.grad_out)
        return out.detach()

    def decode(self) -> torch.Tensor:
        """DECODE_CALLS calls on x, each starting from the state the one before returned, as generation runs."""
        hx = self.inputs.hx
        with torch.no_grad():
            for _ in range(DECODE_CALLS):
                y, hx = self.module(self.inputs.x, hx)
        return y

    def drop_grads(self) -> None:
        """Free the gradients: each training step then allocates them, as with zero_grad()."""
        self.module.zero_grad(set_to_none=True)
        self.inputs.x.grad = None


def baseline_module(point: Point, device: torch.device) -> torch.nn.Module:
    name, extra = MODULES[point.cell]
    cls = getattr(torch.nn, name)
    return cls(point.input_size, point.hidden, point.layers, device=device, dtype=DTYPES[point.dtype], **extra)


def fused_module(point: Point, backend: str, baseline: torch.nn.Module) -> torch.nn.Module:
    """The fusedrnn module for backend, holding baseline's weights."""
    import fusedrnn

    name, extra = MODULES[point.cell]
    weight = next(baseline.parameters())
    module = getattr(fusedrnn, name)(
        point.input_size,
        point.hidden,
        point.layers,
        device=weight.device,
        dtype=weight.dtype,
        backend=backend,
        **extra,
    )
    module.load_state_dict(baseline.state_dict())
    return module


def ran_backend(module: torch.nn.Module, backend: str) -> str:
    """The backend that ran the last call; raises if it is not the one asked for by name."""
    if backend == BASELINE:
        return BASELINE
    ran = module.last_backend
    if backend != "auto" and ran != backend:
        raise RuntimeError(f"asked for {backend!r} but {ran!r} ran")
    return ran


# ------------------------------------------------------------------------------------- measuring


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def short(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}"


def unavailable_reason(backend: str, point: Point, device: torch.device) -> str | None:
    """Why fusedrnn says backend cannot run point's cell and dtype on device; None if it can.

    Asks the resolver that makes a module raise for an unavailable backend, so "n/a" rows are the
    library's own verdict and any other failure of a backend is an error.
    """
    if backend == BASELINE:
        return None
    try:
        from fusedrnn.backend import resolve
    except Exception as error:  # noqa: BLE001 - then every fused row says why
        return f"fusedrnn does not import: {short(error)}"
    try:
        resolve(backend, device.type, DTYPES[point.dtype], point.cell)
    except RuntimeError as error:
        return first_line(error)
    return None


def prepare_cases(point: Point, config: Config):
    """Build and probe one case per backend.

    Returns {backend: case}, {backend: what ran}, {backend: output of the probe}, {backend: failure}.
    """
    torch.manual_seed(config.seed)
    baseline = baseline_module(point, config.device)
    inputs = Inputs(point, config.device)
    cases, ran, outputs, failures = {}, {}, {}, {}
    for backend in config.backends:
        reason = unavailable_reason(backend, point, config.device)
        if reason:
            failures[backend] = f"n/a: {reason}"
            continue
        try:
            module = baseline if backend == BASELINE else fused_module(point, backend, baseline)
            case = Case(module, inputs, point.mode)
            outputs[backend] = case()  # the probe: fails fast, and compiles or allocates before the warm-up
            ran[backend] = ran_backend(module, backend)
            cases[backend] = case
        except Exception as error:  # noqa: BLE001 - a backend that fails is a row saying how, not a crash
            failures[backend] = f"error: {short(error)}"
    return cases, ran, outputs, failures


def max_diff(output: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    if reference is None:
        return None
    return (output.double() - reference.double()).abs().max().item()


def measure_point(point: Point, config: Config) -> list[Row]:
    """Rows for every backend at point, in config.backends order."""
    cases, ran, outputs, failures = prepare_cases(point, config)
    try:
        stats = time_interleaved(cases, config.device, config.schedule)
    except Exception as error:  # noqa: BLE001 - a backend that passed the probe failed later: no timings here
        failures.update({backend: f"error: {short(error)}" for backend in cases})
        cases, stats = {}, {}
    base = stats.get(BASELINE)
    reference = outputs.get(BASELINE)
    fields = {f.name: getattr(point, f.name) for f in dataclasses.fields(Point)}
    rows = []
    for backend in config.backends:
        if backend in failures:
            rows.append(Row(**fields, backend=backend, status=failures[backend]))
            continue
        timing = stats[backend]
        cases[backend].drop_grads()  # so the peak counts them
        memory = peak_memory_bytes(cases[backend], config.device)
        rows.append(
            Row(
                **fields,
                backend=backend,
                status="ok",
                ran=ran[backend],
                **dataclasses.asdict(timing),
                tokens_per_s=point.tokens / (timing.median_ms / 1e3),
                speedup=base.median_ms / timing.median_ms if base else None,
                peak_mem_mb=None if memory is None else memory / 2**20,
                max_diff=max_diff(outputs[backend], reference),
            )
        )
    return rows


def run_sweep(config: Config, progress: bool = True, on_rows=None) -> list[Row]:
    """Measure every point of config; rows in point order, backends in config order. on_rows(rows) is called
    with each point's rows as soon as they are measured."""
    if config.device.type == "cuda":
        torch.cuda.set_device(config.device)  # timing events record on the current device's stream
    points = sweep_points(config.sweep, config.input_size)
    rows: list[Row] = []
    with tqdm(points, unit="point", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        for point in bar:
            bar.set_postfix_str(point.label(), refresh=True)
            measured = measure_point(point, config)
            rows.extend(measured)
            if on_rows:
                on_rows(measured)
    return rows


# ---------------------------------------------------------------------------------------- reports


TABLE_HEADER = ("cell", "mode", "dtype", "T", "B", "I", "H", "L", "backend", "median ms", "IQR ms",
                "tokens/s", "speed-up", "peak MB", "max diff")  # fmt: skip
LEFT_ALIGNED = {0, 1, 2, 8}


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, fmt) + suffix


def table_line(r: Row) -> tuple[str, ...]:
    """A row's table entries; a failed row ends with its status instead of numbers."""
    cell = r.cell + ("*" if r.tag == "book" else "")
    shape = (cell, r.mode, r.dtype, *(str(v) for v in (r.seq_len, r.batch, r.input_size, r.hidden, r.layers)))
    backend = r.backend if r.ran in (None, r.backend) else f"{r.backend}->{r.ran}"
    if r.status != "ok":
        return (*shape, backend, r.status[:100])
    return (*shape, backend, f"{r.median_ms:.3f}", f"{r.q25_ms:.3f}-{r.q75_ms:.3f}", f"{r.tokens_per_s:,.0f}",
            _num(r.speedup, ".2f", "x"), _num(r.peak_mem_mb, ".1f"), _num(r.max_diff, ".1e"))  # fmt: skip


def format_table(rows: list[Row]) -> str:
    """A fixed-width table: one line per (point, backend); failed rows say why."""
    lines = [TABLE_HEADER, *map(table_line, rows)]
    widths = [0] * len(TABLE_HEADER)
    for line in lines:
        sized = line if len(line) == len(TABLE_HEADER) else line[:-1]  # a status spans the rest
        widths = [max(w, len(v)) for w, v in itertools.zip_longest(widths, sized, fillvalue="")]
    text = []
    for line in lines:
        padded = [v.ljust(w) if i in LEFT_ALIGNED else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))]
        if len(line) < len(TABLE_HEADER):
            padded[-1] = line[-1]
        text.append("  ".join(padded).rstrip())
    text.insert(1, "-" * len(text[0]))
    legend = "(* the book's model; speed-up = torch.nn median / this median; IQR = 25th-75th percentile)"
    return "\n".join([*text, legend])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def metadata(config: Config, argv: list[str]) -> dict:
    """Everything needed to read the numbers later: machine, versions, commit, date, command."""
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(config.device),
        "device_type": config.device.type,
        "dtypes": list(config.sweep.dtypes),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "fusedrnn": package_version("fusedrnn"),
        "platform": platform.platform(),
        "git_commit": git("rev-parse", "HEAD") or "none (no commit yet)",
        "git_dirty": bool(git("status", "--porcelain")),
        "command": " ".join(["python", "bench/run.py", *argv]),
        "preset": config.preset,
        "backends": list(config.backends),
        "schedule": dataclasses.asdict(config.schedule),
        "seed": config.seed,
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews the numbers
        "timer": "CUDA events after a synchronize" if config.device.type == "cuda" else "host perf_counter",
        "peak_memory": "max_memory_allocated - memory_allocated before the call"
        if config.device.type == "cuda"
        else "peak RSS (VmHWM after clear_refs) - RSS before the call, after malloc_trim",
    }
    if config.device.type == "cuda":
        meta.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    return meta


CSV_META = ("device", "date", "torch", "triton", "python", "git_commit")


class RowWriter:
    """The CSV and JSON results, written as the rows are measured, so that a run cut off (a time limit, a kill)
    leaves every row measured until then: the CSV gains each point's rows and is flushed; the JSON is replaced
    whole (atomically) after each point, with "complete": false until close(). One CSV row per (point,
    backend), each carrying the device, date, versions and commit."""

    def __init__(self, csv_path: Path, json_path: Path, meta: dict):
        self.json_path, self.meta, self.rows = json_path, meta, []
        self.csv_file = csv_path.open("w", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=[f.name for f in dataclasses.fields(Row)] + list(CSV_META))
        self.csv.writeheader()
        self.add([])

    def add(self, rows: list[Row]) -> None:
        for row in rows:
            self.csv.writerow({**dataclasses.asdict(row), **{k: self.meta[k] for k in CSV_META}})
        self.csv_file.flush()
        self.rows.extend(rows)
        self._write_json(complete=False)

    def close(self) -> None:
        self.csv_file.close()
        self._write_json(complete=True)

    def _write_json(self, complete: bool) -> None:
        partial = self.json_path.with_name(self.json_path.name + ".partial")
        data = {"meta": self.meta, "complete": complete, "results": [dataclasses.asdict(r) for r in self.rows]}
        partial.write_text(json.dumps(data, indent=1))
        os.replace(partial, self.json_path)


def _markdown_table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(l) + " |" for l in lines)]


def _brief_status(r: Row) -> str:
    return r.status.split(":")[0]  # "n/a" or "error"; the CSV has the reason


def book_table(rows: list[Row]) -> list[str]:
    """Every backend on the book's model: time, spread, throughput, speed-up, memory."""
    lines = [
        [r.mode, r.dtype, r.backend, f"{r.median_ms:.2f} ({r.q25_ms:.2f}-{r.q75_ms:.2f})", f"{r.tokens_per_s:,.0f}",
         _num(r.speedup, ".2f", "x"), _num(r.peak_mem_mb, ".1f")]
        if r.status == "ok" else [r.mode, r.dtype, r.backend, _brief_status(r), "", "", ""]
        for r in rows if r.tag == "book"
    ]  # fmt: skip
    return _markdown_table(["mode", "dtype", "backend", "median ms (IQR)", "tokens/s", "speed-up", "peak MB"], lines)


def speedup_table(rows: list[Row]) -> list[str]:
    """Speed-up of each fused backend over torch.nn: one line per (backend, cell, mode, dtype, T, L),
    one column per (batch, hidden)."""
    grid = [r for r in rows if r.tag != "book" and r.backend != BASELINE]
    columns = sorted({(r.batch, r.hidden) for r in grid})
    lines: dict[tuple, dict] = {}
    for r in grid:
        key = (r.backend, r.cell, r.mode, r.dtype, str(r.seq_len), str(r.layers))
        value = _num(r.speedup, ".2f", "x") if r.status == "ok" else _brief_status(r)
        lines.setdefault(key, {})[(r.batch, r.hidden)] = value
    header = ["backend", "cell", "mode", "dtype", "T", "L", *(f"B={b} H={h}" for b, h in columns)]
    return _markdown_table(header, [[*key, *(cells.get(c, "") for c in columns)] for key, cells in lines.items()])


def markdown_report(rows: list[Row], meta: dict) -> str:
    """The README's results block: machine, date, command, the book's model, speed-up grid."""
    return "\n".join([
        (f"{meta['device']}; torch {meta['torch']}, Python {meta['python']}, commit {meta['git_commit'][:12]}, "
         f"{meta['date']} (1-min load average before the run: {meta['load_average_1min']:.2f})."),
        "", f"Reproduce: `{meta['command']}`", "",
        "The book's model (LSTM, T=35, B=32, I=28, H=256, 2 layers):", "", *book_table(rows), "",
        "Speed-up over torch.nn (torch.nn median time / backend median time; > 1 is faster):", "",
        *speedup_table(rows), "",
    ])  # fmt: skip


# ------------------------------------------------------------------------------------------ CLI


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
    p.add_argument("--cells", type=listof(CELLS, "cell"), help=f"{', '.join(CELLS)} ({lists})")
    p.add_argument("--batch", type=listof(positive_int, "batch"), help=f"batch sizes ({lists})")
    p.add_argument("--hidden", type=listof(positive_int, "hidden"), help=f"hidden sizes ({lists})")
    p.add_argument("--seq-len", type=listof(positive_int, "seq-len"), help=f"sequence lengths ({lists})")
    p.add_argument("--layers", type=listof(positive_int, "layers"), help=f"layer counts ({lists})")
    p.add_argument("--input-size", type=positive_int, help="input features (default: the hidden size)")
    p.add_argument("--dtypes", type=listof(tuple(DTYPES), "dtype"), help=f"{', '.join(DTYPES)} ({lists})")
    p.add_argument("--modes", type=listof(MODES, "mode"), help=f"{', '.join(MODES)} ({lists})")
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
    overrides = {k: tuple(v) for k in ("cells", "batch", "hidden", "seq_len", "layers", "dtypes", "modes")
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
    paths["markdown"].write_text(markdown_report(rows, meta))
    if paths["plot"]:
        from bench.plot import plot_speedups

        plot_speedups([dataclasses.asdict(r) for r in rows], paths["plot"], f"{meta['device']}, torch {meta['torch']}")
    print("wrote " + ", ".join(str(p) for p in paths.values() if p))
    errors = [r for r in rows if r.status.startswith("error")]
    return 1 if args.strict and errors else 0


if __name__ == "__main__":
    sys.exit(main())
