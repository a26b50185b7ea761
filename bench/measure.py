"""bench/run.py's measuring: the points of a sweep, the modules and inputs at a point, and one row per backend.

Every point (cell x pass x dtype x seq len x batch x hidden x layers, plus the book's model) times torch.nn
(cuDNN on CUDA, torch's own kernels on the CPU) and every fusedrnn backend for the device, all with the same
weights (copied from the torch.nn module) and the same fresh random inputs and initial states. A backend that
is unavailable or fails is kept as a row ("n/a: ..." / "error: ...").
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import sys

import torch
from tqdm import tqdm

import fusedrnn
from bench.presets import DECODE_CALLS, Sweep
from bench.timing import Schedule, peak_memory_bytes, time_interleaved
from fusedrnn.backend import resolve
from fusedrnn.cells import CELLS

BASELINE = "torch.nn"
FUSED_BACKENDS = {"cpu": ("reference", "cpp"), "cuda": ("reference", "triton", "cuda")}
BACKENDS = (BASELINE, "auto", "reference", "cpp", "triton", "cuda")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
BOOK = {"cell": "lstm", "seq_len": 35, "batch": 32, "input_size": 28, "hidden": 256, "layers": 2}


def book_shape(cell: str = "lstm") -> tuple:
    """The book's model as (cell, T, B, I, H, layers), for another cell if asked."""
    return (cell, *(BOOK[k] for k in ("seq_len", "batch", "input_size", "hidden", "layers")))


@dataclasses.dataclass(frozen=True)
class Point:
    """One benchmark shape; x: (seq_len, batch, input_size), h: (layers, batch, hidden). pass_ is a PASSES name
    (the "pass" column of the results; the trailing underscore only dodges Python's keyword)."""

    cell: str
    pass_: str
    dtype: str
    seq_len: int
    batch: int
    input_size: int
    hidden: int
    layers: int
    tag: str = ""

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch * (DECODE_CALLS if self.pass_ == "decode" else 1)

    def label(self) -> str:
        return (
            f"{self.cell} {self.pass_} {self.dtype} T={self.seq_len} B={self.batch} "
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


def book_point(pass_: str, dtype: str) -> Point:
    """The book's model; in the decode pass as its predict_ch8 generates text: one sequence, one token per call."""
    decode = {"seq_len": 1, "batch": 1} if pass_ == "decode" else {}
    return Point(pass_=pass_, dtype=dtype, tag="book", **{**BOOK, **decode})


def sweep_points(sweep: Sweep, input_size: int | None) -> list[Point]:
    """The book's model first, then the grid (I = hidden unless given); no shape twice."""
    book = [book_point(p, d) for d in sweep.dtypes for p in sweep.passes]
    grid = [
        Point(cell, pass_, dtype, t, b, input_size or h, h, layers)
        for dtype, pass_, cell, layers, t, h, b in itertools.product(
            sweep.dtypes, sweep.passes, sweep.cells, sweep.layers, sweep.seq_len, sweep.hidden, sweep.batch
        )
    ]
    book_shapes = {dataclasses.replace(p, tag="") for p in book}
    return book + [p for p in grid if p not in book_shapes]


# ---------------------------------------------------------------------------------------- modules


def torch_rnn(cell: str, *args, **kwargs) -> torch.nn.Module:
    """torch.nn's module for cell (a fusedrnn.cells name); args and kwargs go to its constructor (input_size,
    hidden_size, num_layers, device, dtype, ...)."""
    spec = CELLS[cell]
    return spec.nn_class(*args, **spec.nn_kwargs, **kwargs)


def fused_twin(module: torch.nn.Module, backend: str) -> torch.nn.Module:
    """The fusedrnn module running backend, with a copy of module's weights (module: torch.nn's or fused)."""
    return fusedrnn.convert(copy.deepcopy(module), backend)


def ran_backend(module: torch.nn.Module, backend: str) -> str:
    """The backend that ran the last call; raises if it is not the one asked for by name."""
    if backend == BASELINE:
        return BASELINE
    ran = module.last_backend
    if backend != "auto" and ran != backend:
        raise RuntimeError(f"asked for {backend!r} but {ran!r} ran")
    return ran


# ------------------------------------------------------------------------------------------ cases


class Inputs:
    """Fresh random tensors shared by all backends at one point (never zeros).

    x: (T, B, I), requires grad in the train pass; hx: (L, B, H), a (h0, c0) pair for LSTM;
    grad_out: (T, B, H), the gradient fed to backward.
    """

    def __init__(self, point: Point, device: torch.device):
        dtype = DTYPES[point.dtype]
        shape = (point.layers, point.batch, point.hidden)
        self.x = torch.randn(point.seq_len, point.batch, point.input_size, device=device, dtype=dtype)
        self.x.requires_grad_(point.pass_ == "train")
        h0 = torch.randn(shape, device=device, dtype=dtype)
        self.hx = (h0, torch.randn(shape, device=device, dtype=dtype)) if CELLS[point.cell].has_c else h0
        self.grad_out = torch.randn(point.seq_len, point.batch, point.hidden, device=device, dtype=dtype)


class Case:
    """One module on shared inputs; calling it runs one benchmark step of the point's pass."""

    def __init__(self, module: torch.nn.Module, inputs: Inputs, pass_: str):
        self.module, self.inputs, self.pass_ = module, inputs, pass_

    def __call__(self) -> torch.Tensor:
        """One step; returns the output y: (T, B, H) (decode: the last call's)."""
        if self.pass_ == "inference":
            with torch.no_grad():
                return self.module(self.inputs.x, self.inputs.hx)[0]
        if self.pass_ == "decode":
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
        resolve(backend, device.type, DTYPES[point.dtype], point.cell)
    except RuntimeError as error:
        return first_line(error)
    return None


def prepare_cases(point: Point, config: Config):
    """Build and probe one case per backend.

    Returns {backend: case}, {backend: what ran}, {backend: output of the probe}, {backend: failure}.
    """
    torch.manual_seed(config.seed)
    baseline = torch_rnn(point.cell, point.input_size, point.hidden, point.layers, device=config.device,
                         dtype=DTYPES[point.dtype])  # fmt: skip
    inputs = Inputs(point, config.device)
    cases, ran, outputs, failures = {}, {}, {}, {}
    for backend in config.backends:
        reason = unavailable_reason(backend, point, config.device)
        if reason:
            failures[backend] = f"n/a: {reason}"
            continue
        try:
            module = baseline if backend == BASELINE else fused_twin(baseline, backend)
            case = Case(module, inputs, point.pass_)
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
