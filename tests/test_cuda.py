"""CUDA backend vs cuDNN (torch.nn on CUDA) and a float64 reference, with the oracle of conftest.py.

Every cell (LSTM incl. proj_size, GRU, RNN tanh/relu), 1-3 layers, bidirectional, PackedSequence,
float32 / float16 / bfloat16, awkward shapes (H=123, B=1, T=1, I != H), the book's model, and every
scheme (persistent, per_step, gemm) as well as the automatic choice (fusedrnn/planner.py). Unidirectional stacks run as
one wavefront; with dropout masks they are checked against the reference's stack contract. Every buffer the kernels
write is NaN-poisoned first (fusedrnn.cuda.POISON), so an element a kernel never wrote fails the
oracle's finiteness check. The gpu-marked tests skip without CUDA; the rest run anywhere.
"""

from pathlib import Path

import pytest
import torch
from conftest import (
    AWKWARD_SHAPES,
    CELLS,
    FACTOR,
    FLOOR,
    RELU_H_BOUND,
    SHAPE_ARGS,
    cast_call,
    check_oracle,
    check_stack_oracle,
    keep_off_relu_kink,
    kink_prone,
    make_pair,
    num_states,
    off_relu_kink,
    random_cotangents,
    random_hx,
    random_input,
    random_layer_call,
    random_packed,
    random_stack_call,
    rel_err,
)

from fusedrnn import cells, reference
from fusedrnn import cuda as cuda_backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCHEMES = ("persistent", "per_step", "gemm")


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    monkeypatch.setattr(cuda_backend, "POISON", True)


def _use_scheme(monkeypatch, scheme):
    monkeypatch.setattr(cuda_backend, "SCHEME", scheme)


# ---- anywhere ---------------------------------------------------------------------------------------------
def test_cpu_is_refused_with_the_reason():
    assert "CUDA device" in cuda_backend.unavailable_reason("cpu", torch.float32, "lstm")
    fused, _ = make_pair("lstm", 3, 4, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA device"):
        fused(random_input(2, 1, 3, dtype=torch.float32))


def test_float64_is_refused():
    assert cuda_backend.unavailable_reason("cuda", torch.float64, "gru") is not None


# ---- GPU --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(
    SHAPE_ARGS,
    [*AWKWARD_SHAPES, (3, 40, 8, 64, 1, True)],  # two batch tiles of the kernels
)
def test_matches_cudnn(monkeypatch, scheme, dtype, cell, T, B, I, H, layers, bidirectional):
    _use_scheme(monkeypatch, scheme)
    fused, ref = make_pair(cell, I, H, "cuda", device="cuda", num_layers=layers, bidirectional=bidirectional)
    x, hx = random_input(T, B, I), random_hx(cell, num_states(layers, bidirectional), B, H)
    if kink_prone(cell, dtype):  # relu in half precision: inputs away from the kink (conftest says why)
        hx = off_relu_kink(fused, ref, x, hx)
    check_oracle(fused, ref, x, hx, dtype=dtype, device="cuda")
    assert fused.last_backend == "cuda"
    assert cuda_backend.last_scheme() == scheme


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("H,P", [(9, 4), (64, 32)])
def test_lstm_proj(monkeypatch, scheme, dtype, bidirectional, H, P):
    _use_scheme(monkeypatch, scheme)
    fused, ref = make_pair("lstm", 5, H, "cuda", device="cuda", num_layers=2, proj_size=P, bidirectional=bidirectional)
    hx = random_hx("lstm", num_states(2, bidirectional), 3, H, proj_size=P)
    check_oracle(fused, ref, random_input(6, 3, 5), hx, dtype=dtype, device="cuda")
    assert cuda_backend.last_scheme() == scheme


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed(monkeypatch, scheme, dtype, cell, enforce_sorted, bidirectional):
    _use_scheme(monkeypatch, scheme)
    lengths = [5, 4, 2, 1] if enforce_sorted else [2, 5, 1, 4]
    fused, ref = make_pair(cell, 3, 6, "cuda", device="cuda", num_layers=2, bidirectional=bidirectional)
    packed = random_packed(lengths, 3, enforce_sorted=enforce_sorted)
    hx = random_hx(cell, num_states(2, bidirectional), len(lengths), 6)
    if kink_prone(cell, dtype):  # relu in half precision: inputs away from the kink (conftest says why)
        hx = off_relu_kink(fused, ref, packed, hx)
    check_oracle(fused, ref, packed, hx, dtype=dtype, device="cuda")


@pytest.mark.gpu
def test_packed_lstm_proj():
    fused, ref = make_pair("lstm", 3, 6, "cuda", device="cuda", num_layers=2, bidirectional=True, proj_size=2)
    packed = random_packed([3, 6, 1], 3)
    check_oracle(fused, ref, packed, random_hx("lstm", 4, 3, 6, proj_size=2), dtype=torch.float32, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_no_bias_batch_first_no_hx(cell):
    fused, ref = make_pair(cell, 4, 7, "cuda", device="cuda", num_layers=2, bias=False, batch_first=True)
    check_oracle(fused, ref, random_input(5, 3, 4, batch_first=True), None, dtype=torch.float32, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_book_model_runs_persistent(dtype):
    """The book's model (T=35, B=32, I=28, H=256, 2 layers): the shape the persistent kernel is for."""
    fused, ref = make_pair("lstm", 28, 256, "cuda", device="cuda", num_layers=2)
    check_oracle(fused, ref, random_input(35, 32, 28), random_hx("lstm", 2, 32, 256), dtype=dtype, device="cuda")
    assert cuda_backend.last_scheme() == "persistent"


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)  # float16: the module tests' stacks
@pytest.mark.parametrize("cell", CELLS)
def test_stack_with_dropout_masks(monkeypatch, scheme, dtype, cell):
    """The wavefront's dropout path (torch.nn's cuDNN draws its own masks, so the reference is the baseline)."""
    _use_scheme(monkeypatch, scheme)
    call = random_stack_call(cell, 3, 9, 5, 7, 33, 33, [9, 4, 7, 1, 9], dropout=True)
    cot = random_cotangents(call, torch.empty(3, 9, 5, 33, dtype=torch.float64))
    if kink_prone(cell, dtype):  # relu in half precision: inputs away from the kink (conftest says why)
        gain = max(m.max().item() for m in call.masks)  # dropout's 1 / (1 - p)
        keep_off_relu_kink([[layer] for layer in call.weights], call.x.abs().max().item(), gain)
        call.h0.clamp_(-RELU_H_BOUND, RELU_H_BOUND)
    check_stack_oracle(cuda_backend.stack_forward, cuda_backend.stack_backward, call, cot, dtype, True, "cuda")
    assert cuda_backend.last_scheme() == scheme


@pytest.mark.gpu
def test_weights_too_big_for_chip_run_from_global_memory():
    """H=2048 LSTM in float32 (64 MiB of W_hh) cannot stay on chip: auto runs per_step or gemm (the planner's
    pick between the two is a matter of its constants)."""
    fused, ref = make_pair("lstm", 16, 2048, "cuda", device="cuda")
    check_oracle(fused, ref, random_input(3, 2, 16), random_hx("lstm", 1, 2, 2048), dtype=torch.float32, device="cuda")
    assert cuda_backend.last_scheme() in ("per_step", "gemm")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_contract_fresh_outputs_and_saved(cell):
    """The backend call itself: fresh outputs, the reference's saved layout and values (oracle vs float64)."""
    T, B, I, H = 4, 3, 5, 6
    call = random_layer_call(cell, T, B, I, H, lengths=[4, 2, 3], reverse=True)
    truth = reference.forward(*call)
    on_gpu = cast_call(call, torch.float32, "cuda")
    got, base = cuda_backend.forward(*on_gpu), reference.forward(*on_gpu)
    outs = [t for t in got if t is not None and t.numel()]
    inputs = [t for t in (on_gpu.x, on_gpu.h0, on_gpu.c0, *on_gpu.weights) if t is not None]
    assert len({t.data_ptr() for t in outs}) == len(outs)
    assert not any(t.data_ptr() == a.data_ptr() for t in outs for a in inputs)
    assert got[3].shape == cells.saved_shape(cell, T, B, H)
    for g, b, t in zip(got, base, truth):
        if t is None:
            assert g is None
        elif t.numel():
            assert rel_err(g.cpu(), t) <= FACTOR["output"] * rel_err(b.cpu(), t) + FLOOR[torch.float32]


@pytest.mark.gpu
def test_a_refused_launch_leaves_no_cuda_error(monkeypatch):
    """The persistent scheme forced where the weights do not fit on chip: the backend's own RuntimeError, and no
    CUDA error left behind for the next unrelated torch op (the binding clears the runtime's last error)."""
    _use_scheme(monkeypatch, "persistent")
    fused = make_pair("lstm", 16, 2048, "cuda", device="cuda")[0]
    with pytest.raises(RuntimeError, match="forward kernel failed"):
        fused(torch.randn(3, 2, 16, device="cuda"))
    torch.cuda.synchronize()
    assert (torch.ones(4, device="cuda") * 2).sum().item() == 8


# ---- CUDA graphs and host-device synchronisation -------------------------------------------------------------
# The CUDA path (fusedrnn/modules.py -> ops.py -> cuda.py -> epilogue.py and csrc/cuda/binding.cpp) must not read
# device values on the host: no .item(), no copies to the CPU, no host tensors built per call, no branch on tensor
# values. Shapes, flags and cached device properties decide everything, so a short call can be captured in a CUDA
# graph.
SYNC_FREE_SOURCES = ("cuda.py", "planner.py", "epilogue.py", "csrc/cuda/binding.cpp")  # under fusedrnn/
DEVICE_READS = (".item(", "item<", ".cpu()", ".tolist()", "synchronize", "kCPU", "torch.tensor(", ".nonzero(")


def test_cuda_path_reads_no_device_values():
    """A guard anywhere (the GPU tests below are the proof): none of the calls that copy device values to the
    host appears in the CUDA backend's Python or binding sources."""
    root = Path(cuda_backend.__file__).parent
    found = [(name, what) for name in SYNC_FREE_SOURCES for what in DEVICE_READS if what in (root / name).read_text()]
    assert not found, f"host reads of device values in the CUDA path: {found}"


def _short_call_model(cell, scheme, monkeypatch):
    """A 2-layer fused model of `cell` on CUDA with the backend's scheme forced (None: the planner's choice)."""
    if scheme is not None:
        _use_scheme(monkeypatch, scheme)
    fused, _ = make_pair(cell, 6, 32, "cuda", device="cuda", num_layers=2)
    return fused


def _step(model, x, hx):
    """Forward + backward of a scalar loss; returns the outputs and the parameters' .grad tensors."""
    y, hidden = model(x, hx)
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    loss = y.square().sum() + sum(h.sum() for h in hidden)
    loss.backward()
    return [y, *hidden], [p.grad for p in model.parameters()]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [None, *SCHEMES], ids=lambda s: s or "planned")
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_cuda_graph_captures_forward_and_backward(monkeypatch, cell, T, scheme):
    """torch.cuda.graphs captures a fused module's forward and backward (the recipe of torch's CUDA graph docs:
    warm-up on a side stream, then capture), and a replay on new inputs equals an eager call on them."""
    model = _short_call_model(cell, scheme, monkeypatch)
    B, states = 4, 2
    static_x = torch.randn(T, B, 6, device="cuda", requires_grad=True)
    static_h = random_hx(cell, states, B, 32, dtype=torch.float32)
    static_h = tuple(h.cuda() for h in static_h) if isinstance(static_h, tuple) else static_h.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            _step(model, static_x, static_h)
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)  # the captured backward allocates the .grad tensors from the graph's pool
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_grads = _step(model, static_x, static_h)
    fresh_x = torch.randn_like(static_x)
    with torch.no_grad():
        static_x.copy_(fresh_x)
    graph.replay()
    torch.cuda.synchronize()
    captured = [t.clone() for t in static_out], [g.clone() for g in static_grads]
    model.zero_grad(set_to_none=True)
    eager_out, eager_grads = _step(model, fresh_x.requires_grad_(True), static_h)
    for got, want in zip([*captured[0], *captured[1]], [*eager_out, *eager_grads], strict=True):
        torch.testing.assert_close(got, want.detach())


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [None, *SCHEMES], ids=lambda s: s or "planned")
@pytest.mark.parametrize("T", [1, 5])
def test_cuda_path_does_not_sync(monkeypatch, T, scheme):
    """Forward and backward of a short call under torch.cuda.set_sync_debug_mode("error"): any synchronising
    call (a device value read on the host, a blocking copy) raises. Warmed up first: building the extension and
    the first planning queries are one-time work."""
    model = _short_call_model("lstm", scheme, monkeypatch)
    x = torch.randn(T, 4, 6, device="cuda", requires_grad=True)
    hx = tuple(h.cuda() for h in random_hx("lstm", 2, 4, 32, dtype=torch.float32))
    _step(model, x, hx)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, x, hx)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert model.last_backend == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 32])
def test_auto_runs_the_planners_gpu_backend(monkeypatch, B):
    """auto on CUDA runs the backend planner.plan picks between CUDA and Triton for the call's shape."""
    monkeypatch.delenv("FUSEDRNN_BACKEND", raising=False)
    fused, _ = make_pair("lstm", 28, 256, "auto", device="cuda", num_layers=2)
    x = torch.randn(35, B, 28, device="cuda")
    fused(x)
    assert fused.last_backend == cuda_backend.planned_backend("lstm", x, torch.float32, 256, 256, 2)
