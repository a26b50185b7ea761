"""The op layer: the only caller of kernels.

Two coarse ``torch.library`` custom ops per layer-direction sequence (never per timestep):
``fusedrnn::layer_forward`` and ``fusedrnn::layer_backward``, with fake (meta) implementations so that
``torch.compile`` and ``torch.export`` trace them as single nodes, and autograd registered so the forward
op's backward is the backend's hand-written BPTT. The argument contract is in ``fusedrnn/reference.py``.

Custom ops cannot return None, so absent tensors (c for non-LSTM cells, the gradients of missing biases or
projections) cross the op boundary as empty tensors and are turned back into None on each side.
What autograd saves: the op's inputs, y and the backend's workspace ws (y doubles as the h sequence).
"""

from typing import Optional

import torch
from torch import Tensor

from . import backend as backends
from .reference import GATES

_OPTIONAL_GRADS = (2, 5, 6, 7)  # dc0, db_ih, db_hh, dw_hr


def _empty_like_none(t, like):
    return like.new_empty(0) if t is None else t


def _none_if_empty(t):
    return None if t is None or t.numel() == 0 and t.dim() == 1 else t


@torch.library.custom_op("fusedrnn::layer_forward", mutates_args=())
def layer_forward(
    x: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
    lengths: Optional[Tensor],
    mode: str,
    reverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer, one direction, whole sequence. Returns (y, h_n, c_n or empty, ws)."""
    y, h_n, c_n, ws = backends.get(backend).forward(
        mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse
    )
    return y, h_n, _empty_like_none(c_n, x), ws


@layer_forward.register_fake
def _layer_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, mode, reverse, backend):
    T, B = x.shape[0], x.shape[1]
    H, P = w_hh.shape[0] // GATES[mode], h0.shape[1]
    c_n = x.new_empty(B, H) if mode == "lstm" else x.new_empty(0)
    ws = x.new_empty(backends.get(backend).workspace_shape(mode, T, B, H, P))
    return x.new_empty(T, B, P), x.new_empty(B, P), c_n, ws


@torch.library.custom_op("fusedrnn::layer_backward", mutates_args=())
def layer_backward(
    x: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
    lengths: Optional[Tensor],
    y: Tensor,
    ws: Tensor,
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Optional[Tensor],
    mode: str,
    reverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BPTT of ``layer_forward``. Returns (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr), empty where absent."""
    grads = backends.get(backend).backward(
        mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, ws, dy, dh_n, dc_n
    )
    return tuple(_empty_like_none(g, x) for g in grads)


@layer_backward.register_fake
def _layer_backward_fake(
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, y, ws, dy, dh_n, dc_n, mode, reverse, backend
):
    like = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    return tuple(x.new_empty(0) if t is None else torch.empty_like(t) for t in like)


def _setup_context(ctx, inputs, output):
    *tensors, lengths, mode, reverse, backend = inputs
    y, _, _, ws = output
    ctx.save_for_backward(*tensors, lengths, y, ws)
    ctx.config = (mode, reverse, backend)


def _backward(ctx, dy, dh_n, dc_n, _dws):
    mode, reverse, backend = ctx.config
    saved = ctx.saved_tensors
    grads = layer_backward(*saved[:9], saved[9], saved[10], dy, dh_n, dc_n if mode == "lstm" else None,
                           mode, reverse, backend)
    grads = [_none_if_empty(g) if i in _OPTIONAL_GRADS else g for i, g in enumerate(grads)]
    return (*grads, None, None, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fusedrnn: double backward (a gradient of a gradient) through a fused RNN layer is not supported; "
        "compute it with the torch.nn module (same parameters and state_dict)"
    )


def _setup_nothing(ctx, inputs, output):
    pass


layer_forward.register_autograd(_backward, setup_context=_setup_context)
layer_backward.register_autograd(_no_double_backward, setup_context=_setup_nothing)


def run_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, mode, reverse, backend):
    """Differentiable (y, h_n, c_n or None) for one layer-direction; see the contract in reference.py."""
    y, h_n, c_n, _ = layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, mode, reverse, backend)
    return y, h_n, (c_n if mode == "lstm" else None)
