"""The op layer: the only caller of kernels.

Two coarse ``torch.library`` custom ops per layer-direction sequence (never per timestep):
``fusedrnn::layer_forward`` and ``fusedrnn::layer_backward``, with fake (meta) implementations so that
``torch.compile`` and ``torch.export`` trace them as single nodes, and autograd registered so the forward
op's backward is the backend's hand-written BPTT. The argument contract is in ``fusedrnn/reference.py``.

Custom ops cannot return None, so absent tensors (c for non-LSTM cells, the gradients of missing biases or
projections) cross the op boundary as empty tensors and are turned back into None on each side.
What autograd saves: the op's inputs, y and the backend's workspace ws (y doubles as the h sequence).
Where no gradient can follow (grad mode off, or nothing requires grad) ``run_layer`` asks for no ws
(``save=False``): the backend then skips writing it, which is most of inference's memory traffic.
``layer_backward`` is differentiable too (double backward, on every device): by autograd through the
reference BPTT, which it recomputes from the saved inputs. Autocast is registered on ``layer_forward`` for
CPU and CUDA, matching torch.nn's output dtypes (see the autocast section).
"""

from typing import Optional

import torch
from torch import Tensor

from . import backend as backends
from . import reference
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
    save: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer, one direction, whole sequence. Returns (y, h_n, c_n or empty, ws; ws empty without save)."""
    y, h_n, c_n, ws = backends.get(backend).forward(
        mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save
    )
    return y, h_n, _empty_like_none(c_n, x), ws


@layer_forward.register_fake
def _layer_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, mode, reverse, backend, save=True):
    T, B = x.shape[0], x.shape[1]
    H, P = w_hh.shape[0] // GATES[mode], h0.shape[1]
    c_n = x.new_empty(B, H) if mode == "lstm" else x.new_empty(0)
    ws = x.new_empty(backends.get(backend).workspace_shape(mode, T, B, H, P) if save else (0,))
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
    need_dx: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BPTT of ``layer_forward``. Returns (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr), empty where absent
    (dx too without need_dx: the layer's input needs no gradient, typically the data fed to the first layer)."""
    grads = backends.get(backend).backward(
        mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, ws, dy, dh_n, dc_n, need_dx
    )
    return tuple(_empty_like_none(g, x) for g in grads)


@layer_backward.register_fake
def _layer_backward_fake(
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, y, ws, dy, dh_n, dc_n, mode, reverse, backend, need_dx=True
):
    like = (x if need_dx else None, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    return tuple(x.new_empty(0) if t is None else torch.empty_like(t) for t in like)


def _setup_context(ctx, inputs, output):
    *tensors, lengths, mode, reverse, backend, save = inputs
    y, _, _, ws = output
    ctx.save_for_backward(*tensors, lengths, y, ws)
    ctx.config = (mode, reverse, backend)
    ctx.saved_ws = save
    ctx.set_materialize_grads(False)  # else autograd zero-fills a gradient for ws, a (T, B, .) buffer


def _backward(ctx, dy, dh_n, dc_n, _dws):
    mode, reverse, backend = ctx.config
    if not ctx.saved_ws:
        raise RuntimeError("fusedrnn::layer_forward ran with save=False, so it kept nothing to differentiate")
    saved = ctx.saved_tensors
    y, h0, c0 = saved[9], saved[1], saved[2]
    dy = torch.zeros_like(y) if dy is None else dy
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    dc_n = torch.zeros_like(c0) if dc_n is None and mode == "lstm" else dc_n
    need_dx = ctx.needs_input_grad[0]
    grads = layer_backward(*saved[:9], saved[9], saved[10], dy, dh_n, dc_n if mode == "lstm" else None,
                           mode, reverse, backend, need_dx)
    grads = [_none_if_empty(g) if i in _OPTIONAL_GRADS else g for i, g in enumerate(grads)]
    if not need_dx:
        grads[0] = None
    return (*grads, None, None, None, None, None)


_PRIMALS = range(8)  # layer_backward's x .. w_hr
_COTANGENTS = range(11, 14)  # its dy, dh_n, dc_n


def _setup_backward_context(ctx, inputs, output):
    *tensors, lengths, _y, _ws, dy, dh_n, dc_n, mode, reverse, _backend, need_dx = inputs
    ctx.save_for_backward(*tensors, lengths, dy, dh_n, dc_n)
    ctx.config = (mode, reverse, need_dx)
    ctx.set_materialize_grads(False)


def _double_backward(ctx, *grad_grads):
    """Backward of ``layer_backward`` (double backward, any backend): the reference BPTT, which is plain
    PyTorch, differentiated by autograd, with y and ws recomputed by the reference forward.

    y and ws are functions of the primals; the recomputation carries that dependence, so they get no gradient
    of their own. Higher orders work too: under create_graph the result stays attached to the saved inputs."""
    mode, reverse, need_dx = ctx.config
    *primals, lengths, dy, dh_n, dc_n = ctx.saved_tensors
    if not need_dx:  # the first output was an empty stand-in for dx: nothing flows back through it
        grad_grads = (None, *grad_grads[1:])
    saved = dict(zip([*_PRIMALS, *_COTANGENTS], (*primals, dy, dh_n, dc_n)))
    wanted = [i for i, t in saved.items() if t is not None and ctx.needs_input_grad[i]]
    result = [None] * len(ctx.needs_input_grad)
    with torch.enable_grad():
        # Fresh aliases of the wanted tensors, detached copies of the rest: autograd.grad below then stops at
        # them instead of walking into the graph that produced the saved tensors (already run).
        inputs = {i: None if t is None else t.view_as(t) if i in wanted else t.detach() for i, t in saved.items()}
        *primals, dy, dh_n, dc_n = inputs.values()
        y, _, _, ws = reference.forward(mode, *primals, lengths, reverse)
        grads = reference.backward(mode, *primals, lengths, reverse, y, ws, dy, dh_n, dc_n)
    pairs = [(g, gg) for g, gg in zip(grads, grad_grads) if g is not None and gg is not None and g.requires_grad]
    if wanted and pairs:
        outputs, cotangents = zip(*pairs)
        found = torch.autograd.grad(
            outputs, [inputs[i] for i in wanted], cotangents, allow_unused=True, create_graph=torch.is_grad_enabled()
        )
        for i, g in zip(wanted, found):
            result[i] = g
    return tuple(result)


layer_forward.register_autograd(_backward, setup_context=_setup_context)
layer_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)


# ---- autocast ----------------------------------------------------------------------------------------------
# torch.nn under autocast: cuDNN (CUDA) and oneDNN (the CPU LSTM) cast x, hx and the weights to the autocast
# dtype and return everything in it. On the CPU, torch.nn's GRU and projected LSTM instead run step by step
# with per-op autocast: the GEMMs go low but the state update promotes with the incoming state, so GRU's h
# and the projected LSTM's c come out in that promoted dtype. A fused layer computes wholly in the autocast
# dtype and returns each output in torch.nn's dtype.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocasts(t, device_type):
    """torch's own rule (torch.library.register_autocast): floating tensors on the device, except float64."""
    return t is not None and t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64


def compute_dtype(x):
    """The dtype a layer fed ``x`` computes in: the autocast dtype where autocast casts x, else x's dtype."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type) if _autocasts(x, device_type) else x.dtype
    return x.dtype


def _autocast_kernel(device_type):
    def kernel(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, mode, reverse, backend, save=True):
        low = torch.get_autocast_dtype(device_type)
        tensors = [t.to(low) if _autocasts(t, device_type) else t for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)]
        with torch.autocast(device_type, enabled=False):
            y, h_n, c_n, ws = layer_forward(*tensors, lengths, mode, reverse, backend, save)
        if device_type == "cpu" and mode == "gru":
            state = torch.promote_types(low, h0.dtype)
            y, h_n = y.to(state), h_n.to(state)
        if device_type == "cpu" and w_hr is not None:
            c_n = c_n.to(torch.promote_types(low, c0.dtype))
        return y, h_n, c_n, ws

    return kernel


for _device_type in _AUTOCAST_DEVICES:
    torch.library.impl("fusedrnn::layer_forward", "Autocast" + _device_type.upper(), _autocast_kernel(_device_type))


def run_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, mode, reverse, backend):
    """Differentiable (y, h_n, c_n or None) for one layer-direction; see the contract in reference.py."""
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, h_n, c_n, _ = layer_forward(*tensors, lengths, mode, reverse, backend, save)
    return y, h_n, (c_n if mode == "lstm" else None)
