"""Benchmark presets: which shapes to sweep on each device type, and how long to time each point.

smoke  CI keep-alive: tiny shapes, a few repeats, seconds in all (numbers meaningless).
quick  under 2 minutes on the 2-core CI CPU; the tables in the README come from it.
full   the whole grid; tens of minutes on the CPU.
gpu-lease  CUDA only: what one GPU lease can afford (bench/gpu_check.sh gives it 60 s): the LSTM at a few batch
       and hidden sizes, float32 and bfloat16, the two fused GPU backends against cuDNN (no reference).
decode generation and streaming: DECODE_CALLS calls in a row, each of T = 1 (one token, as text generation runs)
       or a short chunk (T = 2, 8), carrying the state from call to call, under no_grad.

The book's model (LSTM, T=35, B=32, I=28, H=256, 2 layers) is added to every sweep by run.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.timing import Schedule
from fusedrnn.cells import CELL_NAMES

# What one timed call of a point runs (a "pass"; the package's word for lstm / gru / ... is "cell").
# inference: one forward under no_grad; train: forward + backward; decode: DECODE_CALLS forwards of seq_len steps
# each under no_grad, the state of one call the initial state of the next.
PASSES = ("inference", "train", "decode")
DECODE_CALLS = 100


@dataclass(frozen=True)
class Sweep:
    """The grid: every combination of these values is one benchmark point."""

    cells: tuple[str, ...]
    batch: tuple[int, ...]
    hidden: tuple[int, ...]
    seq_len: tuple[int, ...]
    layers: tuple[int, ...]
    dtypes: tuple[str, ...]
    passes: tuple[str, ...] = ("inference", "train")


@dataclass(frozen=True)
class Preset:
    sweeps: dict[str, Sweep]  # keyed by device type: "cpu", "cuda"
    schedule: Schedule
    backends: tuple[str, ...] | None = None  # the fusedrnn backends it times (None: every one for the device)


_SMOKE = Sweep(CELL_NAMES, batch=(2,), hidden=(16,), seq_len=(5,), layers=(1,), dtypes=("float32",))

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        sweeps={"cpu": _SMOKE, "cuda": _SMOKE},
        schedule=Schedule(warmup=1, min_repeats=2, max_repeats=2, budget_s=0.0),
    ),
    "quick": Preset(
        sweeps={
            "cpu": Sweep(
                CELL_NAMES, batch=(1, 8, 32), hidden=(64, 256), seq_len=(35,), layers=(1,), dtypes=("float32",)
            ),
            "cuda": Sweep(
                CELL_NAMES,
                batch=(16, 64, 256),
                hidden=(256, 512, 1024),
                seq_len=(35,),
                layers=(1,),
                dtypes=("float32", "bfloat16"),
            ),
        },
        schedule=Schedule(warmup=2, min_repeats=5, max_repeats=200, budget_s=0.25),
    ),
    "full": Preset(
        sweeps={
            "cpu": Sweep(
                CELL_NAMES,
                batch=(1, 8, 32, 128),
                hidden=(64, 128, 256, 512),
                seq_len=(35, 128),
                layers=(1, 2),
                dtypes=("float32",),
            ),
            "cuda": Sweep(
                CELL_NAMES,
                batch=(1, 16, 64, 256, 1024),
                hidden=(128, 256, 512, 1024, 2048),
                seq_len=(35, 256),
                layers=(1, 2),
                dtypes=("float32", "bfloat16", "float16"),
            ),
        },
        schedule=Schedule(warmup=3, min_repeats=10, max_repeats=500, budget_s=1.0),
    ),
    "gpu-lease": Preset(  # 4 book points + 16 grid points, 3 backends each, ~0.1 s of timed calls per backend
        sweeps={
            "cuda": Sweep(
                ("lstm",), batch=(16, 128), hidden=(256, 1024), seq_len=(100,), layers=(1,),
                dtypes=("float32", "bfloat16"),
            ),
        },
        schedule=Schedule(warmup=2, min_repeats=5, max_repeats=50, budget_s=0.1),
        backends=("cuda", "triton"),
    ),
    "decode": Preset(
        sweeps={
            device: Sweep(
                ("lstm", "gru", "rnn_tanh"),
                batch=(1, 8, 32),
                hidden=(64, 256, 512),
                seq_len=(1, 2, 8),
                layers=(1, 2),
                dtypes=("float32",),
                passes=("decode",),
            )
            for device in ("cpu", "cuda")
        },
        schedule=Schedule(warmup=2, min_repeats=5, max_repeats=50, budget_s=0.25),
    ),
}
