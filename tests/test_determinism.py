"""Determinism: the same inputs give bitwise identical outputs and gradients, run after run.

CPU: every available backend, in the default mode and under torch.use_deterministic_algorithms(True),
which must neither raise nor change a bit. GPU (``gpu`` marker): under deterministic mode a backend either
raises a RuntimeError that says so, as torch's own nondeterministic ops do, or repeats bit for bit.
"""

import pytest
import torch
from conftest import CELLS, make_pair, num_states, on_backends, random_hx, random_input, require, run_model


@pytest.fixture
def deterministic_mode():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _problem(backend, cell, device="cpu"):
    """A model and inputs big enough for the backends' threading to split work: (model, x, hx)."""
    big = not (backend == "triton" and device == "cpu")  # the interpreter runs programs serially: keep it tiny
    T, B, I, H, layers = (6, 64, 24, 48, 2) if big else (3, 2, 3, 4, 1)
    model = make_pair(cell, I, H, backend, num_layers=layers, bidirectional=big, device=device)[0]
    x = random_input(T, B, I, dtype=torch.float32).to(device).requires_grad_()
    hx = random_hx(cell, num_states(layers, bidirectional=big), B, H, dtype=torch.float32)
    hx = tuple(h.to(device).requires_grad_() for h in hx) if isinstance(hx, tuple) else hx.to(device).requires_grad_()
    return model, x, hx


def _assert_bitwise_equal(first, second):
    for kind in ("out", "grad"):
        for i, (a, b) in enumerate(zip(first[kind], second[kind])):
            assert torch.equal(a, b), f"{kind}[{i}] differs between two identical runs"


@on_backends()
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_bitwise_identical_twice(backend, cell):
    model, x, hx = _problem(backend, cell)
    _assert_bitwise_equal(run_model(model, x, hx), run_model(model, x, hx))


@pytest.mark.parametrize("T,B,H", [(1, 1, 64), (2, 4, 256), (2, 32, 256)], ids=["direct", "direct-team", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_small_calls_bitwise_identical_twice(cell, T, B, H):
    """The cpp backend's schedules for one or two steps (csrc/cpu/forward.h: the direct driver on the calling thread,
    its team split by units, the packed driver), with a gradient and through the one-call no_grad forward."""
    require("cpp", "cpu", torch.float32, cell)
    model = make_pair(cell, H, H, "cpp", num_layers=2)[0]
    x = random_input(T, B, H, dtype=torch.float32).requires_grad_()
    hx = random_hx(cell, 2, B, H, dtype=torch.float32)
    hx = tuple(h.requires_grad_() for h in hx) if isinstance(hx, tuple) else hx.requires_grad_()
    _assert_bitwise_equal(run_model(model, x, hx), run_model(model, x, hx))
    with torch.no_grad():
        first, second = model(x, hx), model(x, hx)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)


@on_backends()
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpu_deterministic_mode_runs_unchanged(backend, cell, deterministic_mode):
    model, x, hx = _problem(backend, cell)
    strict = run_model(model, x, hx)
    torch.use_deterministic_algorithms(False)
    _assert_bitwise_equal(strict, run_model(model, x, hx))


@pytest.mark.gpu
@on_backends("cuda")
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_deterministic_mode_raises_or_repeats(backend, cell, deterministic_mode):
    model, x, hx = _problem(backend, cell, device="cuda")
    try:
        first = run_model(model, x, hx)
    except RuntimeError as error:
        assert "determinis" in str(error), f"unexpected error under deterministic mode: {error}"
        return
    _assert_bitwise_equal(first, run_model(model, x, hx))
