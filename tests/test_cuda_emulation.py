"""The CUDA backend's kernels, launchers and binding run on the CPU: host-compiled together with
fusedrnn/csrc/testing/host_emulation.h (fibers for threads, one OS thread per block) into fusedrnn._cuda's API on
CPU tensors, behind fusedrnn/cuda.py's own wrappers (so the epilogue glue runs too), and held to conftest.py's
oracle against the reference backend in float64, with NaN-poisoned outputs: every cell, every scheme (persistent
with its grid barrier, per_step, gemm), lengths, reverse, proj_size, batch tiles, float16/bfloat16, stacks (the
wavefront: 2-3 layers, dropout masks, need_dx, deeper than one launch), and fibers resumed in reverse order to expose
missing barriers. This proves the indexing and the algorithm, not the GPU memory model or speed (no GPU here).
Skipped without the CUDA headers. The nvcc build of the same sources: tests/test_cuda_compile.py."""

import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    CELLS,
    cast_call,
    check_layer_oracle,
    check_stack_oracle,
    random_cotangents,
    random_layer_call,
    random_stack_call,
    random_stack_cotangents,
    stack_results,
)

from fusedrnn import cells, cuda, reference, toolchain
from fusedrnn.epilogue import input_projection

EXTENSIONS_DIR = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
EMULATION_DIR = EXTENSIONS_DIR / "fusedrnn_emulation"


def build_emulated():
    """The binding + kernels built for the host: fusedrnn._cuda's API on CPU tensors (cached by torch)."""
    home = toolchain.find_cuda_home()
    if home is None or not (home / "include" / "cuda_runtime.h").exists():
        pytest.skip("CUDA headers not found (the emulation compiles against cuda_runtime.h)")
    from torch.utils.cpp_extension import load

    # Two translation units so ninja builds them in parallel; the kernels' one must sit at a stable path
    # (a new path every run would defeat torch's build cache).
    kernels = EMULATION_DIR / "kernels_emulated.cpp"
    text = '#include "host_emulation.h"\n'
    if not kernels.exists() or kernels.read_text() != text:
        kernels.parent.mkdir(parents=True, exist_ok=True)
        kernels.write_text(text)
    return load(
        name="fusedrnn_cuda_emulated",
        sources=[str(toolchain.CSRC / "cuda" / "binding.cpp"), str(kernels)],
        extra_include_paths=[str(toolchain.CSRC / "testing"), str(home / "include")],
        extra_cflags=list(toolchain.EMULATION_FLAGS),
    )


@pytest.fixture(scope="module")
def emulated():
    return build_emulated()


@contextlib.contextmanager
def backend_on(module, scheme):
    """fusedrnn.cuda running `module` (the emulated build) under `scheme`, every kernel output NaN-poisoned."""
    saved = cuda._ext, cuda.SCHEME, cuda.POISON
    cuda._ext, cuda.SCHEME, cuda.POISON = (lambda: module), scheme, True
    try:
        yield cuda
    finally:
        cuda._ext, cuda.SCHEME, cuda.POISON = saved


def test_cell_constants_are_the_registrys(emulated):
    """csrc/cuda/api.h's gates and saved rows per cell are fusedrnn/cells.py's (the same binding the GPU build
    compiles)."""
    assert emulated.cell_constants() == {name: (c.gates, c.saved_rows) for name, c in cells.CELLS.items()}


# ---- one layer-direction ----------------------------------------------------------------------------------
def check_layer(emulated, cell, case, scheme, dtype=torch.float32):
    """conftest's oracle for one layer call on the emulated backend; also checks that it ran `scheme`."""
    T, B, I, H, P, lengths, reverse = case
    call = random_layer_call(cell, T, B, I, H, P, lengths, reverse)
    cot = random_cotangents(call, torch.empty(T, B, P, dtype=torch.float64))
    with backend_on(emulated, scheme) as backend:
        check_layer_oracle(backend, call, cot, dtype)
    assert emulated.last_scheme() == scheme


CASES = {  # T, B, I, H, P, lengths, reverse
    "small": (3, 2, 3, 5, 5, None, False),
    "packed-reverse": (4, 5, 4, 6, 6, [4, 1, 3, 2, 4], True),
    "packed": (4, 3, 2, 9, 9, [2, 4, 1], False),
    "two-batch-tiles": (2, 37, 3, 7, 7, None, True),
}
PROJ_CASE = (4, 3, 5, 9, 4, [1, 4, 3], True)


@pytest.mark.parametrize("scheme", ("persistent", "per_step", "gemm"))
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference(emulated, cell, case, scheme):
    check_layer(emulated, cell, CASES[case], scheme)


@pytest.mark.parametrize("scheme", ("persistent", "per_step", "gemm"))
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([1, 4, 3], False), ([4, 2, 3], True)])
def test_lstm_proj(emulated, lengths, reverse, scheme):
    check_layer(emulated, "lstm", (4, 3, 5, 9, 4, lengths, reverse), scheme)


@pytest.mark.parametrize("scheme", ("persistent", "gemm"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("cell", ("lstm", "gru", "rnn_tanh"))
def test_half_precision(emulated, cell, dtype, scheme):
    """gemm: the recurrent products in the layer's dtype (ATen GEMMs, float32 accumulation), as cuDNN does."""
    check_layer(emulated, cell, CASES["packed-reverse"], scheme, dtype)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_gemm_lstm_proj_half(emulated, dtype):
    check_layer(emulated, "lstm", PROJ_CASE, "gemm", dtype)


@pytest.mark.parametrize("scheme", ("persistent", "gemm"))
def test_many_rows(emulated, scheme):
    """T*B > 2048 rows: the float32 weight gradients take the epilogue's blocked float64 sum."""
    check_layer(emulated, "lstm", (60, 40, 3, 4, 4, [60] * 39 + [7], False), scheme)


def test_reverse_fiber_order(emulated):
    """Threads resumed in reverse order at every barrier: a read that only a lucky order makes right fails."""
    script = (
        "import sys; sys.path[:0] = sys.argv[1:2];"
        "import test_cuda_emulation as t; from conftest import CELLS;"
        "m = t.build_emulated();"
        "[t.check_layer(m, cell, t.CASES['packed-reverse'], s) for cell in CELLS for s in ('persistent', 'per_step')];"
        "t.check_layer(m, 'lstm', t.PROJ_CASE, 'persistent');"
        "[t.check_stack(m, cell, t.STACK_CASES['three-packed'], s) for cell in CELLS for s in ('persistent', 'per_step')];"
        "t.check_stack(m, 'lstm', (2, 3, 3, 4, 7, 3, [3, 1, 2], True), 'persistent')"
    )
    env = {**os.environ, "FUSEDRNN_EMU_REVERSE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], env=env, check=False,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


# ---- stacks: the wavefront (layer l at step s alongside layer l + 1 at step s - 1) --------------------------
STACK_CASES = {  # L, T, B, I, H, P, lengths, dropout
    "two": (2, 4, 3, 3, 5, 5, None, True),
    "three-packed": (3, 4, 5, 2, 6, 6, [4, 1, 3, 2, 4], True),
    "no-dropout": (2, 3, 2, 4, 7, 7, [3, 2], False),
    "two-batch-tiles": (2, 2, 37, 3, 4, 4, None, True),
}


def check_stack(emulated, cell, case, scheme, dtype=torch.float32, need_dx=True):
    L, T, B, I, H, P, lengths, dropout = case
    call = random_stack_call(cell, L, T, B, I, H, P, lengths, dropout)
    with backend_on(emulated, scheme) as backend:
        check_stack_oracle(backend.stack_forward, backend.stack_backward, call, random_stack_cotangents(call), dtype, need_dx)
    assert emulated.last_scheme() == scheme


@pytest.mark.parametrize("scheme", ("persistent", "per_step"))
@pytest.mark.parametrize("case", STACK_CASES, ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_stack_matches_reference(emulated, cell, case, scheme):
    check_stack(emulated, cell, STACK_CASES[case], scheme)


@pytest.mark.parametrize("scheme", ("persistent", "per_step"))
@pytest.mark.parametrize("lengths", (None, [3, 1, 2]))
def test_stack_lstm_proj(emulated, lengths, scheme):
    check_stack(emulated, "lstm", (2, 3, 3, 4, 7, 3, lengths, True), scheme)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_stack_half_precision(emulated, cell, dtype):
    check_stack(emulated, cell, STACK_CASES["three-packed"], "persistent", dtype)


@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_stack_without_dx(emulated, cell):
    check_stack(emulated, cell, STACK_CASES["two"], "persistent", need_dx=False)


@pytest.mark.parametrize(
    "cell,layers,H,scheme,wavefront,ran",
    [
        ("gru", 9, 4, "per_step", False, "per_step"),  # deeper than one launch holds
        # auto, the planner on the emulated device (tests/test_planner.py pins its logic): 2 layers' slices
        # exceed the 48 KiB, and T + 1 launches of the per-step wavefront beat 2T grid barriers layer by layer
        ("lstm", 2, 64, "auto", True, "per_step"),
        ("lstm", 2, 8, "auto", True, "persistent"),
        ("rnn_tanh", 2, 64, "per_step", True, "per_step"),  # a forced scheme keeps the wavefront
        ("gru", 3, 8, "gemm", False, "gemm"),  # gemm runs one layer per call
        ("lstm", 2, 5, "gemm", False, "gemm"),
    ],
)
def test_stack_wavefront_or_layer_by_layer(emulated, monkeypatch, cell, layers, H, scheme, wavefront, ran):
    """fusedrnn.cuda's choice for a stack: one wavefront, or one launch per layer (same saved layout either way)."""
    assert emulated.max_layers == 8
    by_layers = []
    for name in ("stack_forward_by_layers", "stack_backward_by_layers"):
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _f=original, **k: by_layers.append(1) or _f(*a, **k))
    call = random_stack_call(cell, layers, 3, 2, 3, H, H, [3, 2], True)
    cot = random_stack_cotangents(call)
    want = stack_results(reference.stack_forward, reference.stack_backward, call, cot, torch.float32)
    by_layers.clear()
    with backend_on(emulated, scheme) as backend:
        got = stack_results(backend.stack_forward, backend.stack_backward, call, cot, torch.float32)
    assert by_layers == ([] if wavefront else [1, 1])
    assert emulated.last_scheme() == ran
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g is None) == (w is None), i
        if w is not None:  # the same float32 arithmetic up to summation order
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"result {i}: {m}")


def test_gemm_refuses_a_stack(emulated):
    call = cast_call(random_stack_call("lstm", 2, 3, 2, 3, 5, 5, None, False), torch.float32)
    gx = input_projection(call.x, call.weights[0].w_ih, call.weights[0].b_ih)
    with pytest.raises(ValueError, match="one layer per call"):
        emulated.stack_forward("lstm", gx, *call[2:], False, True, "gemm", True)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_gemm_stack_by_layers(emulated, cell, dtype):
    """A stack under gemm (fusedrnn.cuda goes layer by layer): dropout masks, lengths, proj_size for lstm."""
    P = 4 if cell == "lstm" else 7
    call = random_stack_call(cell, 3, 4, 5, 3, 7, P, [4, 1, 3, 2, 4], True)
    with backend_on(emulated, "gemm") as backend:
        check_stack_oracle(backend.stack_forward, backend.stack_backward, call, random_stack_cotangents(call), dtype)
    assert emulated.last_scheme() == "gemm"


@pytest.mark.parametrize("scheme", ("persistent", "per_step", "gemm"))
@pytest.mark.parametrize("cell", CELLS)
def test_inference_saves_nothing(emulated, cell, scheme):
    """save=False (no backward follows): the kernels write no saved activations, and the outputs are the same
    bits."""
    layers = 1 if scheme == "gemm" else 2
    call = cast_call(random_stack_call(cell, layers, 4, 3, 3, 5, 5, [4, 2, 3], True), torch.float32)
    with backend_on(emulated, scheme) as backend:
        kept, lean = backend.stack_forward(*call, True), backend.stack_forward(*call, False)
    assert lean[3].shape == (0,) and kept[3].shape == (layers, *cells.saved_shape(cell, 4, 3, 5))
    for a, b in zip(kept[:3], lean[:3]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_stack_random_shapes(emulated):
    """24 seeded random stacks (2-4 layers, any H and proj_size, batch tiles, lengths, dropout, dtypes, both
    schemes) against the oracle. rnn_relu runs in float32 only: in half precision a pre-activation within
    rounding of 0 flips relu's derivative between any two implementations (the float16 reference's own dx
    error reaches 0.03-0.1 at such a kink), so the oracle would fail there by chance, not by a bug."""
    rng = random.Random(2026)
    for _ in range(24):
        cell = rng.choice(CELLS)
        L, T, B = rng.randint(2, 4), rng.randint(1, 5), rng.choice([1, 2, 3, 5, 33])
        I, H = rng.randint(1, 9), rng.randint(1, 40)
        P = rng.randint(1, H) if cell == "lstm" and rng.random() < 0.3 else H
        lengths = [rng.randint(1, T) for _ in range(B)] if rng.random() < 0.5 else None
        if lengths:
            lengths[rng.randrange(B)] = T
        dtype = torch.float32 if cell == "rnn_relu" else rng.choice([torch.float32, torch.float16, torch.bfloat16])
        x = torch.empty(0, dtype=dtype)
        fits = all(emulated.fits_on_chip(cell, x, H, P, L, P != H, backward) for backward in (False, True))
        scheme = rng.choice(["persistent", "per_step"]) if fits else "per_step"
        call = random_stack_call(cell, L, T, B, I, H, P, lengths, rng.random() < 0.6)
        with backend_on(emulated, scheme) as backend:
            check_stack_oracle(backend.stack_forward, backend.stack_backward, call, random_stack_cotangents(call), dtype,
                               rng.random() < 0.8)


# ---- the binding's input checks (the same code the GPU build runs) -------------------------------------------
def _bad_call(emulated, **change):
    """A small LSTM layer forward on the emulated binding, float32, with the named LayerCall fields or weights
    replaced (after layer 0's input projection: the binding's checks are under test)."""
    call = cast_call(random_layer_call("lstm", 4, 3, 5, 6, lengths=[4, 2, 3]), torch.float32)
    gx = input_projection(call.x, call.weights.w_ih, call.weights.b_ih)
    weights = {k: v for k, v in change.items() if k in cells.LayerWeights._fields}
    fields = {k: v for k, v in change.items() if k not in weights}
    call = call._replace(weights=call.weights._replace(**weights), **fields)
    return emulated.forward("lstm", gx, *call[2:], True, "persistent", True)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda: {"lengths": torch.tensor([4, 2, 3], dtype=torch.int32)}, "lengths must be int64"),
        (lambda: {"lengths": torch.tensor([4, 2, 3], device="meta")}, "lengths is on meta"),
        (lambda: {"lengths": torch.tensor([[4, 4], [2, 2], [3, 3]])[:, 0]}, "lengths must be contiguous"),
        (lambda: {"lengths": torch.tensor([4, 2])}, r"lengths must have shape \(B,\) = \(3,\)"),
        (lambda: {"w_hh": torch.randn(24, 6, dtype=torch.float64)}, r"w_hh\[0\] is Double, the input Float"),
        (lambda: {"b_ih": torch.randn(24, dtype=torch.float16)}, r"b_ih\[0\] is Half"),
        (lambda: {"w_ih": torch.randn(24, 5, device="meta")}, r"w_ih\[0\] is on meta"),
    ],
    ids=["lengths-int32", "lengths-device", "lengths-strided", "lengths-shape", "w_hh-dtype", "b_ih-dtype",
         "w_ih-device"],
)
def test_binding_refuses_bad_inputs_by_name(emulated, change, message):
    with pytest.raises(RuntimeError, match=message):
        _bad_call(emulated, **change())


def test_module_with_a_swapped_weight_gets_the_bindings_error(emulated, monkeypatch):
    """Through the public module: a recurrent weight swapped for a float64 one reaches the binding (the modules,
    like torch.nn, leave parameter dtypes to the kernels), which names it instead of reading it as float32."""
    import fusedrnn

    monkeypatch.setattr(cuda, "unavailable_reason", lambda device, dtype, cell: None)
    model = fusedrnn.LSTM(3, 4, num_layers=2, backend="cuda")
    with backend_on(emulated, "persistent"):
        model(torch.randn(5, 2, 3))  # as built, it runs
        model.weight_hh_l1 = torch.nn.Parameter(model.weight_hh_l1.detach().double())
        with pytest.raises(RuntimeError, match=r"w_hh\[1\] is Double, the input Float"):
            model(torch.randn(5, 2, 3))
