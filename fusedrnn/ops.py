"""The op layer: the only caller of kernels.

Coarse ``torch.library`` custom ops, never per timestep: ``fusedrnn::layer_forward`` and
``fusedrnn::layer_backward`` per layer-direction sequence, and ``fusedrnn::stack_forward`` /
``fusedrnn::stack_backward`` for a whole unidirectional stack where the backend runs one (reference.py's stack
contract; the CUDA backend's wavefront). Each has a fake (meta) implementation so that
``torch.compile`` and ``torch.export`` trace them as single nodes, and autograd registered so the forward
op's backward is the backend's hand-written BPTT. The argument contract is in ``fusedrnn/reference.py``.

Custom ops cannot return None, so absent tensors (c for non-LSTM cells, the gradients of missing biases or
projections) cross the op boundary as empty tensors and are turned back into None on each side.
What autograd saves: the op's inputs, y and the backend's workspace ws (y doubles as the h sequence).
Where no gradient can follow (grad mode off, or nothing requires grad) ``run_layer`` asks for no ws
(``save=False``): the backend then skips writing it, which is most of inference's memory traffic.
The backward ops are differentiable too (double backward, on every device): by autograd through the
reference BPTT, which they recompute from the saved inputs. Autocast is registered on both forward ops for
CPU and CUDA, matching torch.nn's output dtypes (see the autocast section).
"""

from typing import Optional

import torch
import torch.utils._pytree as pytree
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


def _save_inputs(ctx, inputs):
    """Save an op's whole input tuple (tensors, lists of tensors, None, strings) for ``_saved_inputs``."""
    leaves, ctx.input_spec = pytree.tree_flatten(tuple(inputs))
    ctx.save_for_backward(*(leaf if isinstance(leaf, Tensor) else None for leaf in leaves))
    ctx.other_leaves = [None if isinstance(leaf, Tensor) else leaf for leaf in leaves]


def _saved_inputs(ctx):
    leaves = [t if t is not None else o for t, o in zip(ctx.saved_tensors, ctx.other_leaves)]
    return pytree.tree_unflatten(leaves, ctx.input_spec)


def _double_backward(ctx, *grad_grads):
    """Backward of a backward op (double backward, any backend): the reference BPTT, which is plain PyTorch,
    differentiated by autograd, with the forward's saved activations recomputed by the reference forward.

    ctx.differentiable: the input positions that can get a gradient (primals and cotangents; y and ws are
    functions of the primals and the recomputation carries that dependence). ctx.recompute(inputs) -> the
    op's outputs from them. Higher orders work too: under create_graph the result stays attached."""
    inputs = list(_saved_inputs(ctx))
    needs = ctx.needs_input_grad  # shorter than inputs where trailing arguments kept their defaults
    wanted = {}  # (position, index in its list or None) -> fresh alias autograd.grad stops at
    with torch.enable_grad():
        # Fresh aliases of the wanted tensors, detached copies of the rest: autograd.grad below then stops at
        # them instead of walking into the graph that produced the saved tensors (already run).
        for i, item in enumerate(inputs[: len(needs)]):
            items, need = (item, needs[i]) if isinstance(item, list) else ([item], [needs[i]])
            fresh = []
            for k, (t, n) in enumerate(zip(items, need)):
                if t is not None and n and i in ctx.differentiable:
                    t = wanted[i, k if isinstance(item, list) else None] = t.view_as(t)
                elif isinstance(t, Tensor):
                    t = t.detach()
                fresh.append(t)
            inputs[i] = fresh if isinstance(item, list) else fresh[0]
        grads = pytree.tree_leaves(ctx.recompute(inputs), is_leaf=lambda t: t is None)
    grad_grads = pytree.tree_leaves(grad_grads, is_leaf=lambda t: t is None)
    pairs = [(g, gg) for g, gg in zip(grads, grad_grads) if g is not None and gg is not None and g.requires_grad]
    found = {}
    if wanted and pairs:
        outputs, cotangents = zip(*pairs)
        got = torch.autograd.grad(
            outputs, list(wanted.values()), cotangents, allow_unused=True, create_graph=torch.is_grad_enabled()
        )
        found = dict(zip(wanted, got))
    result = []
    for i, item in enumerate(_saved_inputs(ctx)[: len(needs)]):
        if isinstance(item, list):
            result.append([found.get((i, k)) for k in range(len(item))])
        else:
            result.append(found.get((i, None)))
    return tuple(result)


def _setup_backward_context(ctx, inputs, output):
    mode, reverse, need_dx = inputs[14], inputs[15], inputs[17]
    _save_inputs(ctx, inputs)
    ctx.differentiable = (*range(8), 11, 12, 13)  # x .. w_hr, dy, dh_n, dc_n
    ctx.set_materialize_grads(False)

    def recompute(i):
        y, _, _, ws = reference.forward(mode, *i[:9], reverse)
        return reference.backward(mode, *i[:9], reverse, y, ws, *i[11:14], need_dx)

    ctx.recompute = recompute


layer_forward.register_autograd(_backward, setup_context=_setup_context)
layer_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)


# ---- stacks ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fusedrnn::stack_forward", mutates_args=())
def stack_forward(
    x: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_ih: list[Tensor],
    w_hh: list[Tensor],
    b_ih: list[Tensor],
    b_hh: list[Tensor],
    w_hr: list[Tensor],
    masks: list[Tensor],
    lengths: Optional[Tensor],
    mode: str,
    backend: str,
    save: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """L unidirectional layers, dropout masks between them (reference.py's stack contract).
    Returns (ys, h_n, c_n or empty, ws; ws empty without save)."""
    ys, h_n, c_n, ws = backends.get(backend).stack_forward(
        mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, save
    )
    return ys, h_n, _empty_like_none(c_n, x), ws


@stack_forward.register_fake
def _stack_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, mode, backend, save=True):
    (T, B), (L, _, P) = x.shape[:2], h0.shape
    H = w_hh[0].shape[0] // GATES[mode]
    c_n = x.new_empty(L, B, H) if mode == "lstm" else x.new_empty(0)
    ws = x.new_empty((L, *backends.get(backend).workspace_shape(mode, T, B, H, P)) if save else (0,))
    return x.new_empty(L, T, B, P), x.new_empty(L, B, P), c_n, ws


@torch.library.custom_op("fusedrnn::stack_backward", mutates_args=())
def stack_backward(
    x: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_ih: list[Tensor],
    w_hh: list[Tensor],
    b_ih: list[Tensor],
    b_hh: list[Tensor],
    w_hr: list[Tensor],
    masks: list[Tensor],
    lengths: Optional[Tensor],
    ys: Tensor,
    ws: Tensor,
    dys: Tensor,
    dh_n: Tensor,
    dc_n: Optional[Tensor],
    mode: str,
    backend: str,
    need_dx: bool = True,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """BPTT of ``stack_forward``: (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr); dx and dc0 empty where
    absent, the lists empty where their parameter lists are."""
    dx, dh0, dc0, *lists = backends.get(backend).stack_backward(
        mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, ys, ws, dys, dh_n, dc_n, need_dx
    )
    return (_empty_like_none(dx, x), dh0, _empty_like_none(dc0, x), *lists)


@stack_backward.register_fake
def _stack_backward_fake(
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, ys, ws, dys, dh_n, dc_n, mode, backend, need_dx=True
):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dc0 = x.new_empty(0) if c0 is None else torch.empty_like(c0)
    lists = ([torch.empty_like(t) for t in ts] for ts in (w_ih, w_hh, b_ih, b_hh, w_hr))
    return dx, torch.empty_like(h0), dc0, *lists


def _setup_stack_context(ctx, inputs, output):
    ys, _, _, ws = output
    _save_inputs(ctx, (*inputs, ys, ws))
    ctx.set_materialize_grads(False)


def _stack_backward(ctx, dys, dh_n, dc_n, _dws):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, mode, backend, save, ys, ws = _saved_inputs(ctx)
    if not save:
        raise RuntimeError("fusedrnn::stack_forward ran with save=False, so it kept nothing to differentiate")
    dys = torch.zeros_like(ys) if dys is None else dys
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    if mode == "lstm":
        dc_n = torch.zeros_like(c0) if dc_n is None else dc_n
    need_dx = ctx.needs_input_grad[0]
    dx, dh0, dc0, *lists = stack_backward(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, ys, ws, dys, dh_n, dc_n if mode == "lstm" else None,
        mode, backend, need_dx,
    )
    grads = (dx if need_dx else None, dh0, _none_if_empty(dc0), *lists, [None] * len(masks), None, None, None, None)
    return grads[: len(ctx.needs_input_grad)]  # trailing arguments left at their defaults take no slot


def _setup_stack_backward_context(ctx, inputs, output):
    mode, need_dx = inputs[15], inputs[17]
    _save_inputs(ctx, inputs)
    ctx.differentiable = (*range(8), 12, 13, 14)  # x .. w_hr, dys, dh_n, dc_n
    ctx.set_materialize_grads(False)

    def recompute(i):
        ys, _, _, ws = reference.stack_forward(mode, *i[:10])
        return reference.stack_backward(mode, *i[:10], ys, ws, *i[12:15], need_dx)

    ctx.recompute = recompute


stack_forward.register_autograd(_stack_backward, setup_context=_setup_stack_context)
stack_backward.register_autograd(_double_backward, setup_context=_setup_stack_backward_context)


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


def _autocast_kernel(op, device_type, mode_index):
    """``op``'s autocast kernel; args[mode_index] is its mode, args[1], args[2], args[7] are h0, c0 and w_hr."""

    def kernel(*args):
        low = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t.to(low) if isinstance(t, Tensor) and _autocasts(t, device_type) else t

        low_args = [[cast(t) for t in a] if isinstance(a, list) else cast(a) for a in args]
        with torch.autocast(device_type, enabled=False):
            y, h_n, c_n, ws = op(*low_args)
        mode, h0, c0, w_hr = args[mode_index], args[1], args[2], args[7]
        if device_type == "cpu" and mode == "gru":
            state = torch.promote_types(low, h0.dtype)
            y, h_n = y.to(state), h_n.to(state)
        if device_type == "cpu" and w_hr is not None and not (isinstance(w_hr, list) and not w_hr):
            c_n = c_n.to(torch.promote_types(low, c0.dtype))
        return y, h_n, c_n, ws

    return kernel


for _device_type in _AUTOCAST_DEVICES:
    for _op, _mode_index in ((layer_forward, 9), (stack_forward, 10)):
        _kernel = _autocast_kernel(_op, _device_type, _mode_index)
        torch.library.impl(_op._qualname, "Autocast" + _device_type.upper(), _kernel)


def _op_adds_nothing(x, tensors):
    """Whether calling a backend directly does exactly what its forward op would, when no gradient can follow:
    nothing traces or records ops (torch.compile, export, jit.trace, make_fx), no mode, tensor subclass or functorch
    transform intercepts them, and autocast is off. Then the custom op's dispatch (about 20 us on the CPU, as much as
    a whole small layer) buys nothing. is_compiling comes first: under Dynamo it is a constant and the rest is
    never traced."""
    return not (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._are_functorch_transforms_active()
        or torch.overrides.has_torch_function(tensors)
        or torch.is_autocast_enabled(x.device.type)
    )


def run_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, mode, reverse, backend):
    """Differentiable (y, h_n, c_n or None) for one layer-direction; see the contract in reference.py."""
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not save and _op_adds_nothing(x, tensors):
        y, h_n, c_n, _ = backends.get(backend).forward(mode, *tensors, reverse, False)
    else:
        y, h_n, c_n, _ = layer_forward(*tensors, mode, reverse, backend, save)
    return y, h_n, (c_n if mode == "lstm" else None)


def run_stack(x, h0, c0, weights, masks, lengths, mode, backend):
    """Differentiable (y, h_n, c_n or None) of a unidirectional stack in one call (the stack contract in
    reference.py). weights: per layer (w_ih, w_hh, b_ih, b_hh, w_hr), None where absent; masks: the dropout
    masks between layers (empty list without dropout)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = [[w for w in column if w is not None] for column in zip(*weights)]
    tensors = (x, h0, c0, *w_ih, *w_hh, *b_ih, *b_hh, *w_hr)
    save = torch.is_grad_enabled() and any([t is not None and t.requires_grad for t in tensors])  # list: see modules
    if not save and _op_adds_nothing(x, (*tensors, *masks, lengths)):
        ys, h_n, c_n, _ = backends.get(backend).stack_forward(
            mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, False
        )
    else:
        ys, h_n, c_n, _ = stack_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, mode, backend, save)
    return ys[-1], h_n, (c_n if mode == "lstm" else None)
