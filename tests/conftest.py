"""Shared test oracle, tolerance table, seeds and markers.

The oracle (flash-attention's): for every output and gradient,
    err(fused) <= FACTOR * err(torch.nn in the same dtype) + FLOOR[dtype]
where err(a) = ||a - ref|| / ||ref|| and ref is torch.nn run in float64 on the same weights and inputs.
FACTOR is 2 for outputs and 3 for gradients; FLOOR absorbs cases where torch.nn happens to be exact.

GPU tests carry the ``gpu`` marker and are skipped without CUDA; nothing here touches CUDA at import.
"""

import os
import random
from typing import NamedTuple

import pytest
import torch
from torch import nn

# Without a GPU, Triton kernels run on CPU tensors through its interpreter; this must be set before any
# kernel module is imported. is_available() only asks the driver; it creates no CUDA context.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedrnn
from fusedrnn import backend as backends
from fusedrnn import cells
from fusedrnn.cells import LayerWeights
from fusedrnn.modules import FUSED_CLASSES as FUSED_BY_TORCH_CLASS

# Strict float32 (bench/gpu_check.sh sets FUSEDRNN_STRICT_FP32=1 for its GPU test stages): torch.nn's cuDNN
# baseline computes float32 without TF32, so its own error is ~1e-6 instead of ~1e-3 and the oracle below
# catches a float32 kernel error of 1e-4. A test that wants TF32 turns it on itself (test_triton_gpu.py).
if os.environ.get("FUSEDRNN_STRICT_FP32") == "1":
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

# ---- the one tolerance table ----------------------------------------------------------------------------
FACTOR = {"output": 2.0, "grad": 3.0}
FLOOR = {  # relative error allowed on top of FACTOR * err(torch.nn)
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

CELLS = cells.CELL_NAMES
SHAPE_ARGS = "T,B,I,H,layers,bidirectional"
AWKWARD_SHAPES = [  # (T, B, I, H, layers, bidirectional), shared by the per-backend model tests
    (5, 3, 4, 6, 1, False),
    (1, 1, 3, 5, 1, False),  # T=1, B=1
    (7, 2, 9, 123, 2, True),  # H=123, I != H
    (4, 5, 6, 6, 3, False),
]
TORCH_CLASSES = {name: cell.nn_class for name, cell in cells.CELLS.items()}
FUSED_CLASSES = {name: FUSED_BY_TORCH_CLASS[cls] for name, cls in TORCH_CLASSES.items()}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer than a few seconds")


def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("gpu") for item in items) and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


# ---- the backends a test runs on ------------------------------------------------------------------------------
# The backends that can run a device type's tensors at all; whether one runs a particular (dtype, cell) there is
# its own unavailable_reason's answer. On the CPU: cpp, the reference, and triton in its interpreter (a testing aid,
# never chosen automatically; conftest sets TRITON_INTERPRET=1 without CUDA). cuda runs CUDA tensors only.
DEVICE_BACKENDS = {"cpu": ("reference", "cpp", "triton"), "cuda": ("reference", "triton", "cuda")}


def on_backends(device="cpu", exclude=()):
    """Parametrise a test's ``backend`` fixture over DEVICE_BACKENDS[device] but ``exclude`` (the caller says
    why); on "cuda" the cases carry the gpu marker."""
    marks = [pytest.mark.gpu] if device == "cuda" else []
    names = [pytest.param(name, marks=marks, id=name) for name in DEVICE_BACKENDS[device] if name not in exclude]
    return pytest.mark.parametrize("backend", names, indirect=True)


def require(backend, device, dtype, cell):
    """Skip the test, with the backend's own reason, where ``backend`` cannot run (device, dtype, cell)."""
    reason = backends._reason(backend, torch.device(device).type, dtype, cell)
    if reason is not None:
        pytest.skip(f"{backend} cannot run {cell} in {dtype} on {device}: {reason}")


@pytest.fixture
def backend(request):
    """The backend name a test is parametrised with (``on_backends``, or indirect=["backend"]), skipped with the
    backend's own reason where it cannot run the test's ``device``, ``dtype`` and ``cell`` parameters (where the
    test has none: cuda if it is marked gpu, else cpu; float32; lstm. A test that runs other cases calls
    ``require`` for them)."""
    params = request.node.callspec.params
    device = params.get("device", "cuda" if request.node.get_closest_marker("gpu") else "cpu")
    require(request.param, device, params.get("dtype", torch.float32), params.get("cell", "lstm"))
    return request.param


TRITON_VARIANTS = ("persistent", "split")  # fusedrnn/triton/common.py's VARIANTS, less "auto" (which picks one)


@pytest.fixture(params=TRITON_VARIANTS)
def triton_variant(request, monkeypatch):
    """Runs a test that uses it once per variant of the Triton kernels: one launch looping over all steps, or
    per-step launches of each phase over (batch tile x unit tile) programs. A test parametrised with it (indirect)
    picks its own; None leaves the default."""
    if request.param is not None:
        from fusedrnn.triton import common

        monkeypatch.setattr(common, "VARIANT", request.param)
    return request.param


# ---- building matching models ---------------------------------------------------------------------------
def cell_kwargs(cell, proj_size=0):
    """What a torch.nn (or fused) constructor needs to be ``cell``, with ``proj_size`` when nonzero."""
    return {**cells.CELLS[cell].nn_kwargs, **({"proj_size": proj_size} if proj_size else {})}


def num_states(layers, bidirectional):
    """The leading size of h0 / c0: num_layers * num_directions."""
    return layers * (2 if bidirectional else 1)


def make_pair(cell, input_size, hidden_size, backend="auto", dtype=torch.float32, device="cpu", **kwargs):
    """(fused, torch.nn) models of one cell kind with identical weights. kwargs go to both constructors."""
    kwargs = {**cell_kwargs(cell), **kwargs}
    fused = FUSED_CLASSES[cell](input_size, hidden_size, backend=backend, dtype=dtype, device=device, **kwargs)
    ref = TORCH_CLASSES[cell](input_size, hidden_size, dtype=dtype, device=device, **kwargs)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def rel_err(a, ref):
    a, ref = a.double(), ref.double()
    scale = ref.norm().clamp_min(1e-30)
    return ((a - ref).norm() / scale).item()


# ---- running a model and collecting everything the oracle compares ---------------------------------------
def _flatten_out(out):
    """Model output -> tuple of tensors (y, h_n[, c_n]); PackedSequence contributes its data."""
    y, hidden = out
    y = y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    return (y, *hidden)


def run_model(model, x, hx=None, grad_seed=1):
    """Forward + backward with fixed random output gradients.

    x: a tensor or PackedSequence (leaf tensors inside require grad); hx: tensor / (h, c) / None.
    Returns {"out": [y, h_n, (c_n)], "grad": [dx, dhx.., d params..]}."""
    out = _flatten_out(model(x, hx))
    g = torch.Generator().manual_seed(grad_seed)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in out]
    leaves = [x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x]
    leaves += [h for h in (hx if isinstance(hx, tuple) else (hx,)) if h is not None]
    leaves += list(model.parameters())
    grads = torch.autograd.grad(out, leaves, cotangents, allow_unused=True)
    return {"out": [o.detach() for o in out], "grad": list(grads)}


def _cast_inputs(x, hx, dtype, device):
    def cast(t):
        return t.detach().to(device=device, dtype=dtype).requires_grad_(True)

    if isinstance(x, nn.utils.rnn.PackedSequence):
        x = nn.utils.rnn.PackedSequence(cast(x.data), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    else:
        x = cast(x)
    if isinstance(hx, tuple):
        hx = tuple(cast(h) for h in hx)
    elif hx is not None:
        hx = cast(hx)
    return x, hx


def check_oracle(fused, ref, x, hx=None, dtype=torch.float32, device="cpu"):
    """Assert the flash-attention oracle for ``fused`` vs ``ref`` (a torch.nn model with the same weights).

    x, hx are float64 CPU tensors (or a PackedSequence); they are cast to (dtype, device) for the two
    models under test and kept in float64 for the reference run. Returns the error table for reporting."""
    gold = ref.to(device="cpu", dtype=torch.float64)
    truth = run_model(gold, *_cast_inputs(x, hx, torch.float64, "cpu"))
    fused, ref = fused.to(device=device, dtype=dtype), ref.to(device=device, dtype=dtype)
    got = run_model(fused, *_cast_inputs(x, hx, dtype, device))
    base = run_model(ref, *_cast_inputs(x, hx, dtype, device))
    table = []
    for kind in ("out", "grad"):
        factor = FACTOR["output" if kind == "out" else "grad"]
        for i, (a, b, t) in enumerate(zip(got[kind], base[kind], truth[kind])):
            if t is None:
                assert a is None, f"{kind}[{i}]: fused has a gradient where torch.nn has none"
                continue
            assert a is not None, f"{kind}[{i}]: fused has no gradient"
            assert torch.isfinite(a).all(), f"{kind}[{i}]: non-finite values"
            err_f, err_t = rel_err(a.cpu(), t), rel_err(b.cpu(), t)
            table.append((kind, i, err_f, err_t))
            assert err_f <= factor * err_t + FLOOR[dtype], (
                f"{kind}[{i}]: fused err {err_f:.3e} > {factor} x torch.nn err {err_t:.3e} + {FLOOR[dtype]:.0e}"
            )
    return table


def random_input(T, B, I, batch_first=False, dtype=torch.float64):
    shape = (B, T, I) if batch_first else (T, B, I)
    return torch.randn(shape, dtype=dtype)


def random_hx(cell, num_states, B, hidden_size, proj_size=0, dtype=torch.float64):
    h = torch.randn(num_states, B, proj_size or hidden_size, dtype=dtype)
    if cell == "lstm":
        return h, torch.randn(num_states, B, hidden_size, dtype=dtype)
    return h


def random_packed(lengths, I, enforce_sorted=False, dtype=torch.float64):
    """A PackedSequence of random sequences with the given lengths (any order)."""
    seqs = [torch.randn(n, I, dtype=dtype) for n in lengths]
    return nn.utils.rnn.pack_sequence(seqs, enforce_sorted=enforce_sorted)


# ---- one model-and-input problem, by value -----------------------------------------------------------------
class Case(NamedTuple):
    """A fused-vs-torch.nn problem: test_modules.py's matrix lists them, test_fuzz.py draws them."""

    cell: str
    input_size: int
    hidden: int
    T: int
    batch: int
    kwargs: dict  # the constructors' other keywords: num_layers, bidirectional, batch_first, bias, proj_size
    form: str = "batched"  # "batched" (batch_first as kwargs say), "unbatched" ((T, I), batch 1), "packed"
    lengths: tuple = ()  # "packed": the batch's lengths, any order
    enforce_sorted: bool = False  # "packed": lengths in decreasing order, packed with enforce_sorted
    with_hx: bool = True  # False: the model starts from zero states


def case_id(case):
    """A readable test id: cell, sizes, the non-default keywords and fields."""
    words = [case.cell, f"T{case.T}", f"B{case.batch}", f"I{case.input_size}", f"H{case.hidden}"]
    words += [f"{k}={v}" for k, v in case.kwargs.items()]
    words += [case.form, *map(str, case.lengths)] if case.form != "batched" else []
    words += ["sorted"] if case.enforce_sorted else []
    return "-".join(words + ([] if case.with_hx else ["no_hx"]))


def case_inputs(case):
    """(x, hx) of a Case in float64 (hx None without with_hx); unbatched hx drops its batch axis like x."""
    if case.form == "packed":
        x = random_packed(case.lengths, case.input_size, case.enforce_sorted)
    elif case.form == "unbatched":  # (T, I) whatever batch_first says
        x = random_input(case.T, 1, case.input_size)[:, 0]
    else:
        x = random_input(case.T, case.batch, case.input_size, case.kwargs.get("batch_first", False))
    if not case.with_hx:
        return x, None
    states = num_states(case.kwargs.get("num_layers", 1), case.kwargs.get("bidirectional", False))
    hx = random_hx(case.cell, states, case.batch, case.hidden, case.kwargs.get("proj_size", 0))
    if case.form == "unbatched":
        hx = tuple(h[:, 0] for h in hx) if isinstance(hx, tuple) else hx[:, 0]
    return x, hx


def check_case(case, backend, dtype, device="cpu"):
    """Hold ``backend`` to the oracle on ``case`` in (dtype, device), and check that it ran (skipped, with the
    backend's reason, where it cannot run the case). Relu in half precision on CUDA meets its kink by chance:
    such cases need off_relu_kink (below)."""
    require(backend, device, dtype, case.cell)
    fused, ref = make_pair(case.cell, case.input_size, case.hidden, backend, device=device, **case.kwargs)
    check_oracle(fused, ref, *case_inputs(case), dtype=dtype, device=device)
    assert fused.last_backend == backend


# ---- relu RNNs in half precision: inputs kept away from relu's kink ------------------------------------------
# Where a pre-activation lies within rounding of 0, whether relu passes the gradient depends on its last bit, so
# two correct half-precision implementations (cuDNN, ours) disagree there by O(1) in that element, and "within
# 2x / 3x of torch.nn's error" fails by chance, not by a bug (README, Numerics). The half-precision relu cases
# therefore use weights that keep every pre-activation z at least RELU_MARGIN from 0, by construction: rows of
# W_ih scaled to L1 norm 1 / (bound on the layer input), rows of W_hh to L1 norm RELU_RHO, b_ih = 0 and
# b_hh = +-(RELU_MARGIN + 1 + RELU_RHO * RELU_H_BOUND), alternating in sign over the units (half on, half off).
# Then |z - b_hh| <= 1 + RELU_RHO * RELU_H_BOUND while |h| <= RELU_H_BOUND = (2 + RELU_MARGIN) / (1 - 2 RELU_RHO),
# so z = +-[2, 8]: rounding to half (~0.4 % of |z|) cannot reach the kink.
RELU_MARGIN, RELU_RHO = 2.0, 0.25
RELU_H_BOUND = (2 + RELU_MARGIN) / (1 - 2 * RELU_RHO)


@torch.no_grad()
def keep_off_relu_kink(layers, x_bound, input_gain=1.0):
    """Rescale a relu RNN's weights in place as above. layers: per layer, a LayerWeights per direction (w_ih
    (H, I), w_hh (H, H), b_ih, b_hh (H,)); layer 0's inputs satisfy |x| <= x_bound, a higher layer's are the
    outputs below times at most input_gain (dropout's 1 / (1 - p)). Initial states need |h0| <= RELU_H_BOUND."""
    bound = x_bound
    for directions in layers:
        for w in directions:
            w.w_ih.div_(w.w_ih.abs().sum(1, keepdim=True) * bound)
            w.w_hh.div_(w.w_hh.abs().sum(1, keepdim=True) / RELU_RHO)
            w.b_ih.zero_()
            signs = torch.arange(w.b_hh.numel(), device=w.b_hh.device) % 2 * 2 - 1
            w.b_hh.copy_(signs * (RELU_MARGIN + 1 + RELU_RHO * RELU_H_BOUND))
        bound = RELU_H_BOUND * input_gain


def relu_layers(model):
    """A relu nn.RNN's parameters in keep_off_relu_kink's layout."""
    suffixes = ("", "_reverse") if model.bidirectional else ("",)
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    return [[LayerWeights(*(getattr(model, f"{n}_l{l}{s}") for n in names)) for s in suffixes]
            for l in range(model.num_layers)]


def off_relu_kink(fused, ref, x, hx):
    """The pair of make_pair with keep_off_relu_kink's weights (ref gets fused's); x: float64 (T, B, I) or a
    PackedSequence; hx: float64 (L * D, B, H). Returns hx within the bound."""
    keep_off_relu_kink(relu_layers(fused), x.data.abs().max().item())
    ref.load_state_dict(fused.state_dict())
    return hx.clamp(-RELU_H_BOUND, RELU_H_BOUND)


def kink_prone(cell, dtype):
    return cell == "rnn_relu" and dtype in (torch.float16, torch.bfloat16)


# ---- the layer contract (reference.py), called directly ------------------------------------------------
class LayerCall(NamedTuple):
    """The arguments of one backend ``forward`` in contract order: ``backend.forward(*call, save)``."""

    cell: str
    x: torch.Tensor  # (T, B, I)
    h0: torch.Tensor  # (B, P)
    c0: torch.Tensor | None  # (B, H) for lstm
    weights: LayerWeights
    lengths: torch.Tensor | None  # (B,) int64
    reverse: bool


def random_weights(cell, I, H, P=None, bias=True, dtype=torch.float64, device="cpu", scale=0.4):
    """A random LayerWeights (cells.py shapes); P != H gives an LSTM projection. scale: the matrices' standard
    deviation, or "fan_in" for 1 / sqrt(columns) each (pre-activations of order 1 at any size, as torch.nn's
    initialisation keeps them); the biases' is 1."""
    G, P = cells.gates(cell), P or H

    def rand(*shape, s=1.0):
        return torch.randn(*shape, dtype=dtype, device=device) * s

    def matrix(rows, cols):
        return rand(rows, cols, s=cols**-0.5 if scale == "fan_in" else scale)

    return LayerWeights(
        matrix(G * H, I), matrix(G * H, P), rand(G * H) if bias else None, rand(G * H) if bias else None,
        matrix(P, H) if P != H else None,
    )


def random_layer_call(cell, T, B, I, H, P=None, lengths=None, reverse=False, bias=True, dtype=torch.float64,
                      device="cpu"):
    """Random arguments of one layer forward (LayerCall); lengths: a list or None."""
    P = P or H

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    return LayerCall(
        cell, rand(T, B, I), rand(B, P), rand(B, H) if cells.CELLS[cell].has_c else None,
        random_weights(cell, I, H, P, bias, dtype, device),
        None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=device), reverse,
    )


def random_cotangents(call, y):
    """Random (dy, dh_n, dc_n) for a forward call's outputs: y (T, B, P) (a stack's ys: (L, T, B, P)) and the
    call's states."""
    return torch.randn_like(y), torch.randn_like(call.h0), None if call.c0 is None else torch.randn_like(call.c0)


# ---- the stack contract (reference.py), called directly ------------------------------------------------
class StackCall(NamedTuple):
    """The arguments of one backend ``stack_forward`` in contract order: ``backend.stack_forward(*call, save)``."""

    cell: str
    x: torch.Tensor  # (T, B, I)
    h0: torch.Tensor  # (L, B, P)
    c0: torch.Tensor | None  # (L, B, H) for lstm
    weights: list  # L LayerWeights; layer l > 0 has input size P
    masks: list  # L - 1 dropout masks (T, B, P), 1/(1-p) scale included; empty without dropout
    lengths: torch.Tensor | None  # (B,) int64


def random_stack_call(cell, L, T, B, I, H, P=None, lengths=None, dropout=True, bias=True, dtype=torch.float64,
                      device="cpu"):
    """Random arguments of one stack forward (StackCall), weights at "fan_in" scale; lengths: a list or None."""
    P = P or H

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    weights = [random_weights(cell, I if layer == 0 else P, H, P, bias, dtype, device, "fan_in") for layer in range(L)]
    masks = [torch.bernoulli(torch.full((T, B, P), 0.6, dtype=dtype, device=device)) / 0.6 for _ in range(L - 1)]
    return StackCall(
        cell, rand(T, B, I), rand(L, B, P), rand(L, B, H) if cells.CELLS[cell].has_c else None, weights,
        masks if dropout else [], None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=device),
    )


def random_stack_cotangents(call):
    """Random (dys, dh_n, dc_n) for a StackCall, without running it: ys is (L, T, B, P)."""
    L, B, P = call.h0.shape
    return random_cotangents(call, call.x.new_empty(L, call.x.shape[0], B, P))


def cast_call(call, dtype, device="cpu"):
    """A LayerCall or StackCall (or cotangents: a tuple of tensors and None) with its floating tensors in
    (dtype, device) and lengths on device."""

    def cast(t):
        if isinstance(t, (list, tuple)):  # LayerWeights and the calls are tuples too
            items = [cast(u) for u in t]
            return type(t)(*items) if hasattr(t, "_fields") else type(t)(items)
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    return cast(call)


def stack_results(forward, backward, call, cot, dtype, need_dx=True, device="cpu"):
    """Forward then backward of a StackCall (the stack contract) in (dtype, device) with cotangents cot = (dys,
    dh_n, dc_n): the outputs (ys, h_n, c_n) and then the gradients (dx, dh0, dc0, then every layer's LayerWeights
    fields in order) in one flat list."""
    call, cot = cast_call(call, dtype, device), cast_call(cot, dtype, device)
    ys, h_n, c_n, saved = forward(*call)
    dx, dh0, dc0, dweights = backward(*call, ys, saved, *cot, need_dx)
    return [ys, h_n, c_n, dx, dh0, dc0, *(g for layer in dweights for g in layer)]


def layer_results(backend, call, cot, dtype, need_dx=True, device="cpu"):
    """Forward then backward of a LayerCall on ``backend`` (a backend module) in (dtype, device) with cotangents
    cot = (dy, dh_n, dc_n): the outputs (y, h_n, c_n), then the gradients (dx, dh0, dc0, the LayerWeights fields)."""
    call, cot = cast_call(call, dtype, device), cast_call(cot, dtype, device)
    y, h_n, c_n, saved = backend.forward(*call)
    dx, dh0, dc0, dweights = backend.backward(*call, y, saved, *cot, need_dx)
    return [y, h_n, c_n, dx, dh0, dc0, *dweights]


def check_layer_oracle(backend, call, cot, dtype, need_dx=True, device="cpu"):
    """The oracle for a backend's layer calls on a float64 CPU LayerCall; the baseline is the reference backend in
    the same dtype and device, as for stacks."""
    reference = fusedrnn.reference
    truth = layer_results(reference, call, cot, torch.float64, need_dx)
    base = layer_results(reference, call, cot, dtype, need_dx, device)
    _assert_within_oracle(layer_results(backend, call, cot, dtype, need_dx, device), base, truth, dtype)


def check_stack_oracle(forward, backward, call, cot, dtype, need_dx=True, device="cpu"):
    """The oracle for a backend's stack calls on a float64 CPU StackCall; the baseline is the reference backend in
    the same dtype and device (torch.nn has no call with explicit dropout masks)."""
    reference = fusedrnn.reference
    truth = stack_results(reference.stack_forward, reference.stack_backward, call, cot, torch.float64, need_dx)
    base = stack_results(reference.stack_forward, reference.stack_backward, call, cot, dtype, need_dx, device)
    _assert_within_oracle(stack_results(forward, backward, call, cot, dtype, need_dx, device), base, truth, dtype)


def _assert_within_oracle(got, base, truth, dtype):
    """got, base (the reference in got's dtype) and truth (float64): flat lists of outputs (the first 3) and
    gradients, None where absent; each got within FACTOR x base's error + FLOOR of truth."""
    assert len(got) == len(truth)
    for i, (g, b, t) in enumerate(zip(got, base, truth)):
        if t is None:
            assert g is None, f"result {i}: a value where the reference has None"
            continue
        assert torch.isfinite(g).all(), f"result {i}: non-finite (an element the kernel never wrote?)"
        factor = FACTOR["output" if i < 3 else "grad"]
        err, err_ref = rel_err(g.cpu(), t), rel_err(b.cpu(), t)
        assert err <= factor * err_ref + FLOOR[dtype], f"result {i}: err {err:.2e}, reference in {dtype} {err_ref:.2e}"
