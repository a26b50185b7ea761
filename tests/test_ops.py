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
