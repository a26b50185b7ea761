"""The custom ops themselves: torch.library.opcheck (schema, fake, autograd registration) per cell."""

import pytest
import torch

import fusedrnn
from fusedrnn import ops
from fusedrnn.reference import GATES

CPU_BACKENDS = [b for b in fusedrnn.available_backends("cpu") if b != "triton"]


def _layer_args(mode, T=3, B=2, I=4, H=5, P=0, lengths=None, reverse=False, dtype=torch.float64):
    G, P = GATES[mode], P or H

    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    c0 = leaf(B, H) if mode == "lstm" else None
    w_hr = leaf(P, H) if P != H else None
    return (leaf(T, B, I), leaf(B, P), c0, leaf(G * H, I), leaf(G * H, P), leaf(G * H), leaf(G * H), w_hr, lengths,
            mode)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", sorted(GATES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_forward(backend, mode, reverse, packed):
    lengths = torch.tensor([3, 1]) if packed else None
    args = (*_layer_args(mode, lengths=lengths), reverse, backend)
    torch.library.opcheck(ops.layer_forward, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_lstm_proj(backend):
    args = (*_layer_args("lstm", H=6, P=3), True, backend)
    torch.library.opcheck(ops.layer_forward, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", sorted(GATES))
@pytest.mark.parametrize("need_dx", (True, False))
def test_opcheck_backward(backend, mode, need_dx):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, _ = _layer_args(mode)
    y, h_n, c_n, ws = ops.layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, mode, False, backend)
    dy, dh_n = torch.randn_like(y), torch.randn_like(h_n)
    dc_n = torch.randn_like(c_n) if mode == "lstm" else None
    detached = [t.detach() if t is not None else None for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)]
    args = (*detached, lengths, y.detach(), ws.detach(), dy, dh_n, dc_n, mode, False, backend, need_dx)
    torch.library.opcheck(ops.layer_backward, args, test_utils=("test_schema", "test_faketensor"))
    assert (ops.layer_backward(*args)[0].numel() > 0) == need_dx


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
    """save=False keeps no workspace; a gradient through such a call is an error, never a read of an empty ws."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, _ = _layer_args("lstm")
    w_hh = w_hh.detach().requires_grad_()
    y, _, _, ws = ops.layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, "lstm", False, "cpp", False)
    assert ws.numel() == 0
    with pytest.raises(RuntimeError, match="save=False"):
        y.sum().backward()


# ---- the stack ops (reference.py's stack contract; the CUDA backend's wavefront) -----------------------------
def _stack_args(mode, L=2, T=3, B=2, I=4, H=5, P=0, lengths=None, bias=True, dropout=True):
    """(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths) of a unidirectional stack, float64 leaves."""
    G, P = GATES[mode], P or H

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    c0 = leaf(L, B, H) if mode == "lstm" else None
    w_ih = [leaf(G * H, I if layer == 0 else P) for layer in range(L)]
    w_hh = [leaf(G * H, P) for _ in range(L)]
    b_ih = [leaf(G * H) for _ in range(L)] if bias else []
    b_hh = [leaf(G * H) for _ in range(L)] if bias else []
    w_hr = [leaf(P, H) for _ in range(L)] if P != H else []
    masks = [torch.bernoulli(torch.full((T, B, P), 0.7, dtype=torch.float64)) / 0.7 for _ in range(L - 1)]
    return leaf(T, B, I), leaf(L, B, P), c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks if dropout else [], lengths


STACK_CASES = {  # mode, _stack_args keywords
    "lstm": ("lstm", {}),
    "gru-packed": ("gru", {"L": 3, "lengths": torch.tensor([3, 1])}),
    "rnn_tanh-nobias": ("rnn_tanh", {"bias": False, "dropout": False}),
    "rnn_relu": ("rnn_relu", {"B": 3}),
    "lstm-proj": ("lstm", {"H": 6, "P": 3, "lengths": torch.tensor([2, 3])}),
}


@pytest.mark.parametrize("case", STACK_CASES)
def test_opcheck_stack_forward(case):
    mode, kwargs = STACK_CASES[case]
    torch.library.opcheck(ops.stack_forward, (*_stack_args(mode, **kwargs), mode, "reference"))


@pytest.mark.parametrize("case", STACK_CASES)
@pytest.mark.parametrize("need_dx", (True, False))
def test_opcheck_stack_backward(case, need_dx):
    mode, kwargs = STACK_CASES[case]
    args = _stack_args(mode, **kwargs)
    ys, h_n, c_n, ws = ops.stack_forward(*args, mode, "reference")
    dc_n = torch.randn_like(c_n) if mode == "lstm" else None
    detached = [[t.detach() for t in a] if isinstance(a, list) else a.detach() if a is not None else None for a in args]
    args = (*detached, ys.detach(), ws.detach(), torch.randn_like(ys), torch.randn_like(h_n), dc_n, mode, "reference",
            need_dx)
    torch.library.opcheck(ops.stack_backward, args, test_utils=("test_schema", "test_faketensor"))
    assert (ops.stack_backward(*args)[0].numel() > 0) == need_dx


@pytest.mark.parametrize("case", STACK_CASES)
def test_stack_gradients_and_double_backward(case):
    """gradcheck and gradgradcheck (float64) through run_stack: the hand-written stack BPTT and the double
    backward that differentiates the reference BPTT."""
    mode, kwargs = STACK_CASES[case]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths = _stack_args(mode, **kwargs)
    L = len(w_ih)
    leaves = [t for t in (x, h0, c0, *w_ih, *w_hh, *b_ih, *b_hh, *w_hr) if t is not None]

    bias, proj = bool(b_ih), bool(w_hr)

    def fn(*leaves):
        x, h0, *rest = leaves
        c0 = rest.pop(0) if mode == "lstm" else None
        per_layer = [rest[k * L : (k + 1) * L] for k in range(len(rest) // L)]  # w_ih, w_hh[, b_ih, b_hh][, w_hr]
        absent = [None] * L
        w_ih, w_hh, *rest = per_layer
        b_ih, b_hh = (rest.pop(0), rest.pop(0)) if bias else (absent, absent)
        w_hr = rest.pop(0) if proj else absent
        weights = list(zip(w_ih, w_hh, b_ih, b_hh, w_hr))
        y, h_n, c_n = ops.run_stack(x, h0, c0, weights, masks, lengths, mode, "reference")
        if lengths is not None:  # y at padded steps is outside the contract (held, no gradient)
            y = y * (torch.arange(y.shape[0]).unsqueeze(1) < lengths).unsqueeze(2)
        return (y, h_n) if c_n is None else (y, h_n, c_n)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)  # random projections: seconds, not minutes


def test_modules_send_unidirectional_stacks_to_the_stack_op(monkeypatch):
    calls = []
    original = ops.stack_forward

    def spy(*args):
        calls.append(args[-3])  # the mode
        return original(*args)

    monkeypatch.setattr(ops, "stack_forward", spy)
    x = torch.randn(4, 2, 3)
    fusedrnn.LSTM(3, 5, num_layers=3, backend="reference")(x)
    fusedrnn.GRU(3, 5, num_layers=1, backend="reference")(x)  # one layer: the layer op
    fusedrnn.GRU(3, 5, num_layers=2, bidirectional=True, backend="reference")(x)  # both directions feed layer 2
    fusedrnn.GRU(3, 5, num_layers=2, backend="cpp")(x)  # cpp runs layer by layer
    assert calls == ["lstm"]
