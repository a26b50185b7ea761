"""The custom ops themselves: torch.library.opcheck (schema, fake, autograd registration) per cell."""

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import (
    CELLS,
    cast_call,
    on_backends,
    random_cotangents,
    random_layer_call,
    random_stack_call,
    random_stack_cotangents,
    require,
)

import fusedrnn
from fusedrnn import ops

NOT_INTERPRETED = ("triton",)  # opcheck runs each op many times: too slow in Triton's interpreter


def _leaves(call):
    """The call with every floating tensor a float64 leaf that requires grad."""
    return cast_call(call, torch.float64)._replace(
        **{name: pytree.tree_map_only(torch.Tensor, lambda t: t.detach().requires_grad_(), getattr(call, name))
           for name in ("x", "h0", "c0", "weights")}
    )


def _layer_op_args(call, backend):
    """layer_forward's arguments (without save) for a LayerCall."""
    return (call.x, call.h0, call.c0, *call.weights, call.lengths, call.cell, call.reverse, backend)


def _layer_call(cell, H=5, P=None, lengths=None, reverse=False):
    return _leaves(random_layer_call(cell, 3, 2, 4, H, P, lengths, reverse))


@on_backends(exclude=NOT_INTERPRETED)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_forward(backend, cell, reverse, packed):
    call = _layer_call(cell, lengths=[3, 1] if packed else None, reverse=reverse)
    torch.library.opcheck(ops.layer_forward, _layer_op_args(call, backend))


@on_backends(exclude=NOT_INTERPRETED)
def test_opcheck_lstm_proj(backend):
    call = _layer_call("lstm", H=6, P=3, reverse=True)
    torch.library.opcheck(ops.layer_forward, _layer_op_args(call, backend))


@on_backends(exclude=NOT_INTERPRETED)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("need_dx", (True, False))
def test_opcheck_backward(backend, cell, need_dx):
    call = _layer_call(cell)
    y, *_, saved = ops.layer_forward(*_layer_op_args(call, backend))
    dy, dh_n, dc_n = random_cotangents(call, y.detach())
    detached = pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, (call.x, call.h0, call.c0, *call.weights))
    args = (*detached, call.lengths, y.detach(), saved.detach(), dy, dh_n, dc_n, cell, False, backend, need_dx)
    torch.library.opcheck(ops.layer_backward, args, test_utils=("test_schema", "test_faketensor"))
    assert (ops.layer_backward(*args)[0].numel() > 0) == need_dx


@on_backends(exclude=NOT_INTERPRETED)
def test_backend_is_asked_for_dx_only_when_the_input_needs_it(backend, monkeypatch):
    """The first layer's input is data (no grad): its BPTT skips dx; the second layer's input needs one."""
    from fusedrnn import backend as backends

    module = backends.get(backend)
    asked = []
    original = module.backward

    def spy(*args):
        asked.append(args[-1])
        return original(*args)

    monkeypatch.setattr(module, "backward", spy)
    model = fusedrnn.GRU(3, 4, num_layers=2, backend=backend)
    x = torch.randn(5, 2, 3)
    model(x)[0].sum().backward()
    assert asked == [True, False]  # BPTT runs from the last layer down
    asked.clear()
    model(x.requires_grad_())[0].sum().backward()
    assert asked == [True, True] and x.grad is not None


def test_backward_after_a_forward_without_save_raises():
    """save=False keeps no saved activations; a gradient through such a call is an error, never a read of an
    empty ``saved``."""
    require("cpp", "cpu", torch.float64, "lstm")
    call = _layer_call("lstm")
    call = call._replace(x=call.x.detach(), h0=call.h0.detach(), c0=call.c0.detach(),
                         weights=call.weights._replace(w_ih=call.weights.w_ih.detach()))
    y, _, _, saved = ops.layer_forward(*_layer_op_args(call, "cpp"), False)
    assert saved.numel() == 0
    with pytest.raises(RuntimeError, match="save=False"):
        y.sum().backward()


# ---- the stack ops (reference.py's stack contract; the CUDA backend's wavefront) -----------------------------
def _stack_call(cell, L=2, T=3, B=2, I=4, H=5, P=None, lengths=None, bias=True, dropout=True):
    return _leaves(random_stack_call(cell, L, T, B, I, H, P, lengths, dropout, bias))


def _stack_op_args(call):
    """stack_forward's arguments (without save) for a StackCall, on the reference backend."""
    return (call.x, call.h0, call.c0, *ops._columns(call.weights).values(), call.masks, call.lengths, call.cell,
            "reference")


STACK_CASES = {  # cell, _stack_call keywords
    "lstm": ("lstm", {}),
    "gru-packed": ("gru", {"L": 3, "lengths": [3, 1]}),
    "rnn_tanh-nobias": ("rnn_tanh", {"bias": False, "dropout": False}),
    "rnn_relu": ("rnn_relu", {"B": 3}),
    "lstm-proj": ("lstm", {"H": 6, "P": 3, "lengths": [2, 3]}),
}


@pytest.mark.parametrize("case", STACK_CASES)
def test_opcheck_stack_forward(case):
    cell, kwargs = STACK_CASES[case]
    torch.library.opcheck(ops.stack_forward, _stack_op_args(_stack_call(cell, **kwargs)))


@pytest.mark.parametrize("case", STACK_CASES)
@pytest.mark.parametrize("need_dx", (True, False))
def test_opcheck_stack_backward(case, need_dx):
    cell, kwargs = STACK_CASES[case]
    call = _stack_call(cell, **kwargs)
    ys, *_, saved = ops.stack_forward(*_stack_op_args(call))
    dys, dh_n, dc_n = random_stack_cotangents(call)
    *inputs, cell, backend = pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, _stack_op_args(call))
    args = (*inputs, ys.detach(), saved.detach(), dys, dh_n, dc_n, cell, backend, need_dx)
    torch.library.opcheck(ops.stack_backward, args, test_utils=("test_schema", "test_faketensor"))
    assert (ops.stack_backward(*args)[0].numel() > 0) == need_dx


@pytest.mark.parametrize("case", STACK_CASES)
def test_stack_gradients_and_double_backward(case):
    """gradcheck and gradgradcheck (float64) through run_stack: the hand-written stack BPTT and the double
    backward that differentiates the reference BPTT."""
    cell, kwargs = STACK_CASES[case]
    call = _stack_call(cell, **kwargs)
    leaves, structure = pytree.tree_flatten((call.x, call.h0, call.c0, call.weights))  # Nones are no leaves

    def fn(*leaves):
        x, h0, c0, weights = pytree.tree_unflatten(list(leaves), structure)
        y, h_n, c_n = ops.run_stack(x, h0, c0, weights, call.masks, call.lengths, cell, "reference")
        if call.lengths is not None:  # y at padded steps is outside the contract (held, no gradient)
            y = y * (torch.arange(y.shape[0]).unsqueeze(1) < call.lengths).unsqueeze(2)
        return (y, h_n) if c_n is None else (y, h_n, c_n)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)  # random projections: seconds, not minutes


def test_modules_send_unidirectional_stacks_to_the_stack_op(monkeypatch):
    calls = []
    original = ops.stack_forward

    def spy(*args):
        calls.append(args[-3])  # the cell (then backend, save)
        return original(*args)

    monkeypatch.setattr(ops, "stack_forward", spy)
    x = torch.randn(4, 2, 3)
    fusedrnn.LSTM(3, 5, num_layers=3, backend="reference")(x)
    fusedrnn.GRU(3, 5, num_layers=1, backend="reference")(x)  # one layer: the layer op
    fusedrnn.GRU(3, 5, num_layers=2, bidirectional=True, backend="reference")(x)  # both directions feed layer 2
    fusedrnn.GRU(3, 5, num_layers=2, backend="cpp")(x)  # cpp runs layer by layer
    assert calls == ["lstm"]
