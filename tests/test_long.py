"""Long and large problems on every available backend: T = 20,000, batch 4,096, hidden 2,048.

T = 20,000 must run without recursion limits, in time linear in T (a per-step Python loop is fine, a
quadratic one would not finish in CI) and in memory linear in T. The memory test measures the peak bytes a
forward + backward adds (CPU: the peak resident size of a fresh process, big buffers mmapped so a free
returns them; GPU: the caching allocator's peak) and compares it, per timestep, with the analytic size of
what autograd saves (y and the activations the backend saves for backward) and of the BPTT buffers every implementation needs
on top (the gate gradients for the weight GEMMs, and dx).
``python tests/test_long.py BACKEND`` prints the CPU measurements as JSON.
"""

import functools
import gc
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    CELLS,
    DEVICE_BACKENDS,
    FUSED_CLASSES,
    cell_kwargs,
    check_oracle,
    make_pair,
    random_hx,
    random_input,
)

from fusedrnn import cells

TARGETS = [  # (backend, device); the Triton interpreter is far too slow for these sizes
    pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.gpu] if d == "cuda" else [])
    for d in ("cpu", "cuda") for b in DEVICE_BACKENDS[d] if (b, d) != ("triton", "cpu")
]
# T = 20,000 on the GPU: the fused backends only. The reference's per-step loop is the CPU-tested spec; on the GPU
# it would spend ~45,000 Python-driven steps (long + memory tests) of a one-lease budget to prove nothing new.
LONG_TARGETS = [t for t in TARGETS if t.id != "reference-cuda"]
LONG_T = 20_000
LONG_CELLS = ("lstm", "gru", "rnn_tanh")
MEMORY_T = (5_000, 20_000)
MEMORY_SIZES = {"B": 16, "I": 32, "H": 32}  # float32; big enough that activations dwarf allocator noise
MEMORY_SLACK = 1.5  # peak bytes per step allowed, as a multiple of the minimal BPTT bytes per step


@pytest.fixture
def one_thread():
    """20,000 steps of tiny per-step GEMMs: on a 2-core CI machine a second intra-op thread only adds a
    synchronisation per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check(backend, device, cell, fused, ref, x, hx):
    check_oracle(fused, ref, x, hx, dtype=torch.float32, device=device)
    assert fused.last_backend == backend


@pytest.mark.parametrize("backend,device", LONG_TARGETS, indirect=["backend"])
@pytest.mark.parametrize("cell", LONG_CELLS)
def test_long_sequence(backend, device, cell, one_thread):
    fused, ref = make_pair(cell, 3, 5, backend)
    _check(backend, device, cell, fused, ref, random_input(LONG_T, 2, 3), random_hx(cell, 1, 2, 5))


@pytest.mark.parametrize("backend,device", TARGETS, indirect=["backend"])
@pytest.mark.parametrize("cell", CELLS)
def test_batch_4096(backend, device, cell):
    fused, ref = make_pair(cell, 3, 4, backend, bidirectional=True)
    _check(backend, device, cell, fused, ref, random_input(3, 4096, 3), random_hx(cell, 2, 4096, 4))


@pytest.mark.parametrize("backend,device", TARGETS, indirect=["backend"])
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 257), ("gru", 0), ("rnn_tanh", 0)])
def test_hidden_2048(backend, device, cell, proj):
    fused, ref = make_pair(cell, 7, 2048, backend, **({"proj_size": proj} if proj else {}))
    hx = random_hx(cell, 1, 2, 2048, proj_size=proj)
    _check(backend, device, cell, fused, ref, random_input(3, 2, 7), hx)


# ---- memory -------------------------------------------------------------------------------------------------
def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cpu_peak(run):
    """Peak resident bytes ``run()`` adds to this process."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current resident size
    base = _status_bytes("VmRSS")
    run()
    return _status_bytes("VmHWM") - base


def _cuda_peak(run):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _train_step(backend, cell, T, device):
    """A closure running forward + backward over T steps; the model, x and dy exist before it runs."""
    B, I, H = MEMORY_SIZES["B"], MEMORY_SIZES["I"], MEMORY_SIZES["H"]
    model = FUSED_CLASSES[cell](I, H, backend=backend, device=device, **cell_kwargs(cell))
    x = torch.randn(T, B, I, device=device, requires_grad=True)
    dy = torch.randn(T, B, H, device=device)

    def run():
        y, _ = model(x)
        y.backward(dy)

    return run


def _analytic_bytes_per_step(cell):
    """(saved, minimal): bytes per timestep of y + the saved activations, and of those plus the gate gradients
    and dx."""
    B, I, H = MEMORY_SIZES["B"], MEMORY_SIZES["I"], MEMORY_SIZES["H"]
    saved = (B * H + math.prod(cells.saved_shape(cell, 1, B, H))) * 4
    return saved, saved + B * (cells.gates(cell) * H + I) * 4


def measure_memory(backend, cell, device):
    """{"peak": {T: bytes}, "saved_per_step": bytes, "minimal_per_step": bytes} for one forward + backward."""
    peak = _cpu_peak if device == "cpu" else _cuda_peak
    _train_step(backend, cell, 8, device)()  # lazy loads and first-use buffers stay out of the measurement
    peaks = {T: peak(_train_step(backend, cell, T, device)) for T in MEMORY_T}
    saved, minimal = _analytic_bytes_per_step(cell)
    return {"peak": peaks, "saved_per_step": saved, "minimal_per_step": minimal}


@functools.cache
def _cpu_measurements(backend):
    """Measured in a fresh process whose allocator mmaps every buffer of 64 KiB or more, so that the
    resident size follows what is allocated instead of what glibc keeps around; one thread, as above."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, backend], env=env, check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for m in report.values():
        m["peak"] = {int(T): b for T, b in m["peak"].items()}
    return report


@pytest.mark.parametrize("backend,device", LONG_TARGETS, indirect=["backend"])
@pytest.mark.parametrize("cell", LONG_CELLS)
def test_memory_linear_in_T(backend, device, cell):
    m = _cpu_measurements(backend)[cell] if device == "cpu" else measure_memory(backend, cell, device)
    for T, peak in m["peak"].items():
        per_step = peak / T
        assert m["saved_per_step"] <= per_step <= MEMORY_SLACK * m["minimal_per_step"], (
            f"T={T}: peak {per_step:.0f} B/step; saved activations {m['saved_per_step']} B/step, "
            f"minimal BPTT {m['minimal_per_step']} B/step"
        )


if __name__ == "__main__":
    print(json.dumps({cell: measure_memory(sys.argv[1], cell, "cpu") for cell in LONG_CELLS}))
