"""Numerics at the edges, every available CPU backend: huge and tiny magnitudes, NaN/Inf confined to their
sequence, padding that never leaks, and float16 overflow exactly where torch.nn overflows.

Magnitudes and non-finite values are compared with torch.nn run on the same weights and inputs; "no NaN
where torch.nn has none" is checked element by element on outputs and every gradient.
"""

import math

import pytest
import torch
from conftest import (
    CELLS,
    FLOOR,
    RELU_H_BOUND,
    RELU_MARGIN,
    RELU_RHO,
    check_oracle,
    keep_off_relu_kink,
    make_pair,
    num_states,
    off_relu_kink,
    on_backends,
    random_hx,
    random_input,
    random_layer_call,
    random_weights,
    rel_err,
    relu_layers,
    require,
    run_model,
)

from fusedrnn import backend as backends
from fusedrnn.cells import LayerWeights
from fusedrnn.ops import run_layer

NOT_INTERPRETED = ("triton",)  # the model-sized tests: too slow in Triton's interpreter (the small ones run it)


def _scaled(hx, scale):
    return tuple(h * scale for h in hx) if isinstance(hx, tuple) else hx * scale


def _leaves(x, hx):
    """Fresh leaf copies of x and hx (a tensor or a tuple), for one run_model call."""
    hx = tuple(h.clone().requires_grad_() for h in hx) if isinstance(hx, tuple) else hx.clone().requires_grad_()
    return x.clone().requires_grad_(), hx


def _assert_no_new_nan(got, base):
    """got, base: run_model results of the fused model and of torch.nn."""
    for kind in ("out", "grad"):
        for i, (a, b) in enumerate(zip(got[kind], base[kind])):
            new = a.isnan() & ~b.isnan()
            assert not new.any(), f"{kind}[{i}]: {int(new.sum())} NaN where torch.nn has none"


@on_backends(exclude=NOT_INTERPRETED)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("scale", [1e4, 1e30, 1e-30, 1e-40], ids=lambda s: f"{s:.0e}")
def test_extreme_magnitudes(backend, cell, scale):
    """Inputs and initial states scaled far into saturation (1e30: x W ~ 1e30, gradients ~ 1e59 before the
    saturated gates' zero derivatives cancel them) or down to float32 subnormals (1e-40)."""
    fused, ref = make_pair(cell, 3, 5, backend, num_layers=2, bidirectional=True)
    x, hx = random_input(4, 3, 3) * scale, _scaled(random_hx(cell, 4, 3, 5), scale)
    check_oracle(fused, ref, x, hx, dtype=torch.float32)  # asserts finite outputs and gradients


NONFINITE = [  # (value, bidirectional)
    pytest.param(float("nan"), False, id="nan-unidirectional"),
    *(pytest.param(v, True, id=f"{v}-bidirectional") for v in (float("nan"), float("inf"), -float("inf"))),
]


@on_backends(exclude=NOT_INTERPRETED)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("value,bidirectional", NONFINITE)
def test_nonfinite_stays_in_its_sequence(backend, cell, value, bidirectional):
    """One input element of sequence 1 is NaN/Inf: a NaN reaches that sequence's later outputs, the other
    sequences' outputs and their input and state gradients are exactly torch.nn's (the shared weight gradients
    may be polluted, as in torch.nn), and no NaN appears where torch.nn has none."""
    require(backend, "cpu", torch.float64, cell)
    fused, ref = make_pair(cell, 3, 5, backend, num_layers=2, bidirectional=bidirectional, dtype=torch.float64)
    x = random_input(4, 3, 3)
    x[1, 1, 0] = value
    hx = random_hx(cell, num_states(2, bidirectional), 3, 5)
    got, base = run_model(fused, *_leaves(x, hx)), run_model(ref, *_leaves(x, hx))
    _assert_no_new_nan(got, base)
    if math.isnan(value):  # it reaches its own sequence (an Inf may saturate away)
        assert got["out"][0][1:, 1].isnan().any()
    states = len(hx) if isinstance(hx, tuple) else 1
    others = [0, 2]
    per_sequence = got["out"] + got["grad"][: 1 + states], base["out"] + base["grad"][: 1 + states]
    for i, (a, b) in enumerate(zip(*per_sequence)):
        a, b = a[:, others], b[:, others]  # every per-sequence tensor has its batch on axis 1
        assert torch.isfinite(a).all(), f"tensor {i}: non-finite values leaked into other sequences"
        assert rel_err(a, b) <= FLOOR[torch.float64], f"tensor {i}: other sequences differ from torch.nn"


def _run_layer_grads(call, backend, dy):
    """(y, h_n, c_n) of a LayerCall through run_layer, and the gradients of sum(y * dy) + sum(h_n) + sum(c_n)
    w.r.t. every tensor of the call, by name."""
    tensors = {"x": call.x, "h0": call.h0, "c0": call.c0, **call.weights._asdict()}
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items() if v is not None}
    weights = LayerWeights(*(leaves.get(name) for name in LayerWeights._fields))
    y, h_n, c_n = run_layer(leaves["x"], leaves["h0"], leaves.get("c0"), weights, call.lengths, call.cell,
                            call.reverse, backend)
    outs = [o for o in (y, h_n, c_n) if o is not None]
    loss = (y * dy).sum() + sum(o.sum() for o in outs[1:])
    return outs, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


@on_backends()
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
def test_padding_never_leaks(backend, cell, reverse):
    """The op contract: steps t >= lengths[b] are padding. NaN there, in x or in dy, must not reach y at
    valid steps, h_n, c_n or any gradient (x padding stays out of the forward; dy padding out of backward)."""
    dtype = torch.float64 if backends._reason(backend, "cpu", torch.float64, cell) is None else torch.float32
    T, lengths = 5, [3, 5, 1, 4]
    call = random_layer_call(cell, T, 4, 3, 6, lengths=lengths, reverse=reverse, dtype=dtype)
    pad = torch.arange(T).unsqueeze(1) >= call.lengths  # (T, B): True at padded steps
    dy = torch.randn(T, 4, 6, dtype=dtype)
    dy_nan = dy.masked_fill(pad.unsqueeze(2), float("nan"))
    x_nan = call.x.masked_fill(pad.unsqueeze(2), float("nan"))

    (y, *states), grads = _run_layer_grads(call, backend, dy)
    (y_nan, *states_nan), _ = _run_layer_grads(call._replace(x=x_nan), backend, dy)
    assert torch.equal(y_nan[~pad], y[~pad]), "NaN padding in x changed y at valid steps"
    for a, b in zip(states_nan, states):
        assert torch.equal(a, b), "NaN padding in x changed the final state"
    _, grads_nan = _run_layer_grads(call, backend, dy_nan)
    for name, g in grads.items():
        assert torch.equal(grads_nan[name], g), f"NaN in dy at padded steps changed d{name}"


@on_backends()
@pytest.mark.parametrize("cell", CELLS)
def test_float16_overflow_like_torch(backend, cell):
    """Weights and inputs scaled by 300 overflow float16 (max 65504) in the forward of relu RNNs and in
    most backward passes: overflow (inf or NaN) must happen exactly where torch.nn's does, no NaN appears
    where torch.nn has none, and no finite value stands where torch.nn overflowed."""
    require(backend, "cpu", torch.float16, cell)
    fused, ref = make_pair(cell, 3, 5, backend, dtype=torch.float16)
    with torch.no_grad():
        for p in (*fused.parameters(), *ref.parameters()):
            p.mul_(300)
    x = (random_input(4, 3, 3) * 300).half()
    got, base = run_model(fused, x.clone().requires_grad_()), run_model(ref, x.clone().requires_grad_())
    _assert_no_new_nan(got, base)
    for kind in ("out", "grad"):
        for i, (a, b) in enumerate(zip(got[kind], base[kind])):
            assert torch.equal(a.isfinite(), b.isfinite()), f"{kind}[{i}]: overflows differ from torch.nn"
            both = a.isinf() & b.isinf()
            assert torch.equal(a[both], b[both]), f"{kind}[{i}]: infinities of opposite signs"


@on_backends()
@pytest.mark.parametrize("cell", CELLS)
def test_float16_in_range(backend, cell):
    require(backend, "cpu", torch.float16, cell)
    fused, ref = make_pair(cell, 4, 6, backend, num_layers=2)
    check_oracle(fused, ref, random_input(5, 3, 4), random_hx(cell, 2, 3, 6), dtype=torch.float16)


# ---- the half-precision relu cases' inputs (conftest.keep_off_relu_kink) stay away from the kink ---------------
def _relu_preactivations(layers, x, h0, masks=()):
    """Every pre-activation of a relu RNN over x: (T, B, I), float64; layers as for keep_off_relu_kink, h0:
    (L * D, B, H); masks[l]: (T, B, D * H) multiplies the input of layer l + 1 (dropout). -> (N, H) rows."""
    zs, inputs = [], x
    for l, directions in enumerate(layers):
        outputs = []
        for d, w in enumerate(directions):
            h, ys = h0[l * len(directions) + d], [None] * x.shape[0]
            for t in range(x.shape[0]) if d == 0 else reversed(range(x.shape[0])):
                z = inputs[t] @ w.w_ih.T + w.b_ih + h @ w.w_hh.T + w.b_hh
                zs.append(z)
                h = ys[t] = z.clamp_min(0)
            outputs.append(torch.stack(ys))
        inputs = torch.cat(outputs, 2) * (masks[l] if l < len(masks) else 1)
    return torch.cat(zs)


def _rounded(layers, dtype):
    return [[LayerWeights(*(w.detach().to(dtype).double() for w in direction[:4])) for direction in directions]
            for directions in layers]


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("T,B,I,H,layers,bidirectional", [(7, 2, 9, 123, 2, True), (4, 5, 6, 6, 3, False),
                                                          (3, 40, 8, 64, 1, True), (4, 8, 32, 1024, 1, False)])
def test_relu_cases_stay_off_the_kink(dtype, T, B, I, H, layers, bidirectional):
    """With the weights rounded to half and the inputs too, every pre-activation is at least RELU_MARGIN from
    0 (minus rounding), some units are on and some off, and no state leaves the bound."""
    fused, ref = make_pair("rnn_relu", I, H, "reference", dtype=torch.float64, num_layers=layers,
                           bidirectional=bidirectional)
    x, hx = random_input(T, B, I), random_hx("rnn_relu", layers * (1 + bidirectional), B, H) * 3
    hx = off_relu_kink(fused, ref, x, hx)
    assert torch.equal(ref.weight_hh_l0, fused.weight_hh_l0) and hx.abs().max() <= RELU_H_BOUND
    z = _relu_preactivations(_rounded(relu_layers(fused), dtype), x.to(dtype).double(), hx.to(dtype).double())
    assert z.abs().min() >= 0.98 * RELU_MARGIN
    assert (z > 0).any() and (z < 0).any() and z.abs().max() <= 1.02 * (RELU_MARGIN + 2 + 2 * RELU_RHO * RELU_H_BOUND)


def test_relu_stack_with_dropout_stays_off_the_kink():
    """The stack contract's case (test_cuda.py::test_stack_with_dropout_masks): layer inputs scaled by masks."""
    layers, T, B, I, H = 3, 9, 5, 7, 33
    params = [[random_weights("rnn_relu", I if l == 0 else H, H)] for l in range(layers)]
    masks = [torch.bernoulli(torch.full((T, B, H), 0.6, dtype=torch.float64)) / 0.6 for _ in range(layers - 1)]
    x = random_input(T, B, I)
    keep_off_relu_kink(params, x.abs().max().item(), input_gain=1 / 0.6)
    h0 = random_hx("rnn_relu", layers, B, H).clamp(-RELU_H_BOUND, RELU_H_BOUND)
    z = _relu_preactivations(_rounded(params, torch.bfloat16), x.bfloat16().double(), h0, masks)
    assert z.abs().min() >= 0.98 * RELU_MARGIN
