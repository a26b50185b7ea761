"""CPU-side checks of the CUDA backend's sources; no GPU needed, CI runs them.

1. Compile: every csrc/*.cu builds with the local nvcc for sm_80 and sm_90, and ptxas's report shows
   every kernel with no spills and no stack frame (a register array demoted to local memory is a silent
   slowdown in the hot loop). Skipped without nvcc.
2. Host emulation: the same kernels, launchers and pybind11 binding, host-compiled together with
   csrc/host_emulation.h (fibers for threads, one OS thread per block), run on CPU tensors and are held
   to the oracle of conftest.py against the reference backend in float64, with NaN-poisoned outputs:
   every cell, both schemes (persistent with its grid barrier, per_step), lengths, reverse, proj_size,
   batch tiles, float16/bfloat16, stacks (the wavefront: 2-3 layers, dropout masks, need_dx, deeper than one
   launch), and fibers resumed in reverse order to expose missing barriers.
   This proves the indexing and the algorithm, not the GPU memory model or speed. Skipped without the
   CUDA headers.
"""

import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import CELLS, FACTOR, FLOOR, check_stack_oracle, random_stack, rel_err, stack_results

from fusedrnn import reference
from fusedrnn.cuda import CSRC

NVCC = shutil.which("nvcc")
KERNEL_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
EXTENSIONS_DIR = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
EMULATION_DIR = EXTENSIONS_DIR / "fusedrnn_emulation"
KERNELS_PER_FILE = {"lstm_cell.cu": 18, "gru_cell.cu": 18, "rnn_cell.cu": 36}  # fwd/bwd x 3 dtypes x 3 kinds


def _cuda_include():
    from fusedrnn.toolchain import find_cuda_home

    home = find_cuda_home()
    return home / "include" if home and (home / "include" / "cuda_runtime.h").exists() else None


# ---- 1. nvcc + ptxas report -----------------------------------------------------------------------------
PROPERTIES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(text):
    """{(kernel, arch): (stack_bytes, spill_stores, spill_loads, registers)} from `nvcc -Xptxas -v` output."""
    report, current = {}, None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line):
            current = m.groups()
        elif current and (m := PROPERTIES.search(line)):
            report[current] = tuple(int(g) for g in m.groups())
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            report[current] = (*report[current], int(m.group(1)))
            current = None
    return report


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{file name: (nvcc return code, its output)}: each file built once for every arch, archs in parallel."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("nvcc")
    results = {}
    for source in KERNEL_FILES:
        archs = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
        cmd = [NVCC, "-c", "-O3", "-std=c++17", *archs, "--threads", "0", "-Xptxas", "-v", str(source)]
        done = subprocess.run([*cmd, "-o", str(out / "k.o")], check=False, capture_output=True, text=True, timeout=600)
        results[source.name] = (done.returncode, f"{' '.join(cmd)}\n{done.stdout}{done.stderr}")
    return results


def test_every_kernel_file_is_known():
    assert sorted(p.name for p in KERNEL_FILES) == sorted(KERNELS_PER_FILE)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", KERNEL_FILES, ids=lambda p: p.name)
def test_compiles_without_spills(compiled, source, arch):
    returncode, output = compiled[source.name]
    assert returncode == 0, output[-4000:]
    kernels = {k: v for (k, a), v in _ptxas_report(output).items() if a == arch and "_kernel" in k}
    assert len(kernels) == KERNELS_PER_FILE[source.name], output[-4000:]
    for name, (stack, stores, loads, regs) in kernels.items():
        assert (stack, stores, loads) == (0, 0, 0), f"{name} on {arch}: stack {stack} B, spills {stores}/{loads} B"
        assert regs <= 255, f"{name} on {arch}: {regs} registers"


# ---- 2. host emulation ----------------------------------------------------------------------------------
def build_emulated():
    """The binding + kernels built for the host: fusedrnn._cuda's API on CPU tensors (cached by torch)."""
    include = _cuda_include()
    if include is None:
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
        sources=[str(CSRC / "cuda_binding.cpp"), str(kernels)],
        extra_include_paths=[str(CSRC), str(include)],
        extra_cflags=["-std=c++20", "-O1", "-fno-extern-tls-init", "-Wno-unknown-pragmas"],
    )


@pytest.fixture(scope="module")
def emulated():
    return build_emulated()


def _layer(mode, T, B, I, H, P, lengths, bias=True):
    """Random float64 inputs of one layer-direction call: (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)."""
    G = reference.GATES[mode]
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(B, P, dtype=torch.float64)
    c0 = torch.randn(B, H, dtype=torch.float64) if mode == "lstm" else None
    w_ih = torch.randn(G * H, I, dtype=torch.float64) / I**0.5
    w_hh = torch.randn(G * H, P, dtype=torch.float64) / P**0.5
    b_ih = torch.randn(G * H, dtype=torch.float64) if bias else None
    b_hh = torch.randn(G * H, dtype=torch.float64) if bias else None
    w_hr = torch.randn(P, H, dtype=torch.float64) / H**0.5 if P != H else None
    lengths = torch.tensor(lengths, dtype=torch.int64) if lengths is not None else None
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths


def _cotangents(mode, T, B, H, P):
    dc = torch.randn(B, H, dtype=torch.float64) if mode == "lstm" else None
    return torch.randn(T, B, P, dtype=torch.float64), torch.randn(B, P, dtype=torch.float64), dc


def _run(backend, mode, inputs, cot, reverse, dtype, *extra):
    """Forward then backward of `backend` (the contract's forward/backward) in `dtype`.

    Returns the outputs and gradients, and the schemes the two calls ran (emulated backend only)."""
    cast = [t if t is None or t.dtype == torch.int64 else t.to(dtype) for t in inputs]
    y, h_n, c_n, ws = backend.forward(mode, *cast, reverse, True, *extra)
    schemes = [backend.last_scheme()] if extra else []
    dy, dh, dc = (t if t is None else t.to(dtype) for t in cot)
    grads = backend.backward(mode, *cast, reverse, y, ws, dy, dh, dc, True, *extra)
    schemes += [backend.last_scheme()] if extra else []
    return [y, h_n, c_n, *grads], schemes


NAMES = ("y", "h_n", "c_n", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr")
CASES = {  # T, B, I, H, P, lengths, reverse
    "small": (3, 2, 3, 5, 5, None, False),
    "packed-reverse": (4, 5, 4, 6, 6, [4, 1, 3, 2, 4], True),
    "packed": (4, 3, 2, 9, 9, [2, 4, 1], False),
    "two-batch-tiles": (2, 37, 3, 7, 7, None, True),
}


def _check(emulated, mode, case, scheme, dtype=torch.float32):
    T, B, I, H, P, lengths, reverse = case
    inputs = _layer(mode, T, B, I, H, P, lengths)
    cot = _cotangents(mode, T, B, H, P)
    truth, _ = _run(reference, mode, inputs, cot, reverse, torch.float64)
    base, _ = _run(reference, mode, inputs, cot, reverse, dtype)
    got, schemes = _run(emulated, mode, inputs, cot, reverse, dtype, scheme, True)  # poisoned outputs
    assert schemes == [scheme, scheme]
    for name, g, b, t in zip(NAMES, got, base, truth):
        if t is None:
            assert g is None, name
            continue
        assert torch.isfinite(g).all(), f"{name}: non-finite (an element the kernel never wrote?)"
        factor = FACTOR["output" if name in ("y", "h_n", "c_n") else "grad"]
        err, err_ref = rel_err(g, t), rel_err(b, t)
        assert err <= factor * err_ref + FLOOR[dtype], f"{name}: err {err:.2e} vs reference in {dtype} {err_ref:.2e}"


@pytest.mark.parametrize("scheme", ("persistent", "per_step", "gemm"))
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("mode", CELLS)
def test_emulated_matches_reference(emulated, mode, case, scheme):
    _check(emulated, mode, CASES[case], scheme)


@pytest.mark.parametrize("scheme", ("persistent", "per_step", "gemm"))
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([1, 4, 3], False), ([4, 2, 3], True)])
def test_emulated_lstm_proj(emulated, lengths, reverse, scheme):
    _check(emulated, "lstm", (4, 3, 5, 9, 4, lengths, reverse), scheme)


@pytest.mark.parametrize("scheme", ("persistent", "gemm"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("mode", ("lstm", "gru", "rnn_tanh"))
def test_emulated_half_precision(emulated, mode, dtype, scheme):
    """gemm: the recurrent products in the layer's dtype (ATen GEMMs, float32 accumulation), as cuDNN does."""
    _check(emulated, mode, CASES["packed-reverse"], scheme, dtype)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_emulated_gemm_lstm_proj_half(emulated, dtype):
    _check(emulated, "lstm", (4, 3, 5, 9, 4, [1, 4, 3], True), "gemm", dtype)


def test_emulated_reverse_fiber_order(emulated):
    """Threads resumed in reverse order at every barrier: a read that only a lucky order makes right fails."""
    script = (
        "import sys, torch; sys.path[:0] = sys.argv[1:3];"
        "import test_cuda_compile as t; from conftest import CELLS;"
        "m = t.build_emulated();"
        "[t._check(m, mode, t.CASES['packed-reverse'], s) for mode in CELLS for s in ('persistent', 'per_step')];"
        "t._check(m, 'lstm', (4, 3, 5, 9, 4, [1, 4, 3], True), 'persistent');"
        "[t._check_stack(m, mode, t.STACK_CASES['three-packed'], s)"
        " for mode in CELLS for s in ('persistent', 'per_step')];"
        "t._check_stack(m, 'lstm', (2, 3, 3, 4, 7, 3, [3, 1, 2], True), 'persistent')"
    )
    env = {**os.environ, "FUSEDRNN_EMU_REVERSE": "1"}
    here = str(Path(__file__).parent)
    done = subprocess.run(
        ["python", "-c", script, here, str(CSRC.parent)], env=env, check=False, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("scheme", ("persistent", "gemm"))
def test_emulated_many_rows(emulated, scheme):
    """T*B > 1024 rows: the float32 weight gradients take the binding's blocked float64 sum."""
    _check(emulated, "lstm", (30, 40, 3, 4, 4, [30] * 39 + [7], False), scheme)


# ---- stacks: the wavefront (layer l at step s alongside layer l + 1 at step s - 1) --------------------------
def _emulated_stack(emulated, scheme):
    """The binding's stack calls behind the reference's signatures: forward in time, poisoned buffers."""

    def forward(mode, *args):
        return emulated.stack_forward(mode, *args, False, True, scheme, True)

    def backward(mode, *args):
        return emulated.stack_backward(mode, *args[:10], False, *args[10:], scheme, True)

    return forward, backward


STACK_CASES = {  # L, T, B, I, H, P, lengths, dropout
    "two": (2, 4, 3, 3, 5, 5, None, True),
    "three-packed": (3, 4, 5, 2, 6, 6, [4, 1, 3, 2, 4], True),
    "no-dropout": (2, 3, 2, 4, 7, 7, [3, 2], False),
    "two-batch-tiles": (2, 2, 37, 3, 4, 4, None, True),
}


def _check_stack(emulated, mode, case, scheme, dtype=torch.float32, need_dx=True):
    L, T, B, I, H, P, lengths, dropout = case
    inputs, cot = random_stack(mode, L, T, B, I, H, P, lengths, dropout)
    check_stack_oracle(*_emulated_stack(emulated, scheme), mode, inputs, cot, dtype, need_dx)
    assert emulated.last_scheme() == scheme


@pytest.mark.parametrize("scheme", ("persistent", "per_step"))
@pytest.mark.parametrize("case", STACK_CASES, ids=str)
@pytest.mark.parametrize("mode", CELLS)
def test_emulated_stack_matches_reference(emulated, mode, case, scheme):
    _check_stack(emulated, mode, STACK_CASES[case], scheme)


@pytest.mark.parametrize("scheme", ("persistent", "per_step"))
@pytest.mark.parametrize("lengths", (None, [3, 1, 2]))
def test_emulated_stack_lstm_proj(emulated, lengths, scheme):
    _check_stack(emulated, "lstm", (2, 3, 3, 4, 7, 3, lengths, True), scheme)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("mode", ("lstm", "gru"))
def test_emulated_stack_half_precision(emulated, mode, dtype):
    _check_stack(emulated, mode, STACK_CASES["three-packed"], "persistent", dtype)


@pytest.mark.parametrize("mode", ("lstm", "gru"))
def test_emulated_stack_without_dx(emulated, mode):
    _check_stack(emulated, mode, STACK_CASES["two"], "persistent", need_dx=False)


@pytest.mark.parametrize(
    "mode,layers,H,scheme,wavefront,ran",
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
def test_emulated_stack_wavefront_or_layer_by_layer(emulated, monkeypatch, mode, layers, H, scheme, wavefront, ran):
    """fusedrnn.cuda's choice for a stack: one wavefront, or one launch per layer (same ws layout either way)."""
    from fusedrnn import cuda

    assert emulated.max_layers == 8
    monkeypatch.setattr(cuda, "_ext", lambda: emulated)
    monkeypatch.setattr(cuda, "SCHEME", scheme)
    monkeypatch.setattr(cuda, "POISON", True)
    by_layers = []
    for name in ("stack_forward_by_layers", "stack_backward_by_layers"):
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _f=original, **k: by_layers.append(1) or _f(*a, **k))
    inputs, cot = random_stack(mode, layers, 3, 2, 3, H, H, [3, 2], True)
    want = stack_results(reference.stack_forward, reference.stack_backward, mode, inputs, cot, torch.float32)
    by_layers.clear()
    got = stack_results(cuda.stack_forward, cuda.stack_backward, mode, inputs, cot, torch.float32)
    assert by_layers == ([] if wavefront else [1, 1])
    assert emulated.last_scheme() == ran
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g is None) == (w is None), i
        if w is not None:  # the same float32 arithmetic up to summation order
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"result {i}: {m}")


def test_emulated_gemm_refuses_a_stack(emulated):
    inputs, _ = random_stack("lstm", 2, 3, 2, 3, 5, 5, None, False)
    args = [[t.float() for t in a] if isinstance(a, list) else a if a is None else a.float() for a in inputs]
    with pytest.raises(ValueError, match="one layer per call"):
        emulated.stack_forward("lstm", *args, False, True, "gemm", True)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("mode", CELLS)
def test_emulated_gemm_stack_by_layers(emulated, monkeypatch, mode, dtype):
    """A stack under gemm (fusedrnn.cuda goes layer by layer): dropout masks, lengths, proj_size for lstm."""
    from fusedrnn import cuda

    monkeypatch.setattr(cuda, "_ext", lambda: emulated)
    monkeypatch.setattr(cuda, "SCHEME", "gemm")
    monkeypatch.setattr(cuda, "POISON", True)
    P = 4 if mode == "lstm" else 7
    inputs, cot = random_stack(mode, 3, 4, 5, 3, 7, P, [4, 1, 3, 2, 4], True)
    check_stack_oracle(cuda.stack_forward, cuda.stack_backward, mode, inputs, cot, dtype, True)
    assert emulated.last_scheme() == "gemm"


@pytest.mark.parametrize("scheme", ("persistent", "per_step", "gemm"))
@pytest.mark.parametrize("mode", CELLS)
def test_emulated_inference_writes_no_workspace(emulated, mode, scheme):
    """save=False (no backward follows): the kernels write no ws, and the outputs are the same bits."""
    inputs, _ = random_stack(mode, 1 if scheme == "gemm" else 2, 4, 3, 3, 5, 5, [4, 2, 3], True)
    args = [[t.float() for t in a] if isinstance(a, list) else a if a is None or a.dtype == torch.int64 else a.float()
            for a in inputs]
    saved = emulated.stack_forward(mode, *args, False, True, scheme, True)
    lean = emulated.stack_forward(mode, *args, False, False, scheme, True)
    layers = 1 if scheme == "gemm" else 2
    assert lean[3].shape == (0,) and saved[3].shape == (layers, *reference.workspace_shape(mode, 4, 3, 5, 5))
    for a, b in zip(saved[:3], lean[:3]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_emulated_stack_random_shapes(emulated):
    """24 seeded random stacks (2-4 layers, any H and proj_size, batch tiles, lengths, dropout, dtypes, both
    schemes) against the oracle. rnn_relu runs in float32 only: in half precision a pre-activation within
    rounding of 0 flips relu's derivative between any two implementations (the float16 reference's own dx
    error reaches 0.03-0.1 at such a kink), so the oracle would fail there by chance, not by a bug."""
    rng = random.Random(2026)
    for _ in range(24):
        mode = rng.choice(CELLS)
        L, T, B = rng.randint(2, 4), rng.randint(1, 5), rng.choice([1, 2, 3, 5, 33])
        I, H = rng.randint(1, 9), rng.randint(1, 40)
        P = rng.randint(1, H) if mode == "lstm" and rng.random() < 0.3 else H
        lengths = [rng.randint(1, T) for _ in range(B)] if rng.random() < 0.5 else None
        if lengths:
            lengths[rng.randrange(B)] = T
        dtype = torch.float32 if mode == "rnn_relu" else rng.choice([torch.float32, torch.float16, torch.bfloat16])
        x = torch.empty(0, dtype=dtype)
        fits = all(emulated.fits_on_chip(mode, x, H, P, L, P != H, backward) for backward in (False, True))
        scheme = rng.choice(["persistent", "per_step"]) if fits else "per_step"
        inputs, cot = random_stack(mode, L, T, B, I, H, P, lengths, rng.random() < 0.6)
        check_stack_oracle(*_emulated_stack(emulated, scheme), mode, inputs, cot, dtype, rng.random() < 0.8)


# ---- the binding's input checks (the same code the GPU build runs) -------------------------------------------
def _bad_call(emulated, **change):
    """A small LSTM layer call to the binding, float32, with the named arguments replaced."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths = (
        t if t is None or t.dtype == torch.int64 else t.float() for t in _layer("lstm", 4, 3, 5, 6, 6, [4, 2, 3])
    )
    args = {"x": x, "h0": h0, "c0": c0, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, "w_hr": w_hr,
            "lengths": lengths}
    args.update(change)
    return emulated.forward("lstm", *args.values(), False, True, "persistent", True)


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
    from fusedrnn import cuda

    monkeypatch.setattr(cuda, "_ext", lambda: emulated)
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device, dtype, mode: None)
    monkeypatch.setattr(cuda, "SCHEME", "persistent")
    model = fusedrnn.LSTM(3, 4, num_layers=2, backend="cuda")
    model(torch.randn(5, 2, 3))  # as built, it runs
    model.weight_hh_l1 = torch.nn.Parameter(model.weight_hh_l1.detach().double())
    with pytest.raises(RuntimeError, match=r"w_hh\[1\] is Double, the input Float"):
        model(torch.randn(5, 2, 3))
