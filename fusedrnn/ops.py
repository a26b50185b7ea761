"""The op layer: the only caller of kernels.

Coarse ``torch.library`` custom ops, never per timestep: ``fusedrnn::layer_forward`` and
``fusedrnn::layer_backward`` per layer-direction sequence, and ``fusedrnn::stack_forward`` /
``fusedrnn::stack_backward`` for a whole unidirectional stack where the backend runs one (reference.py's stack
contract; the CUDA backend's wavefront). Each has a fake (meta) implementation so that
``torch.compile`` and ``torch.export`` trace them as single nodes, and autograd registered so the forward
op's backward is the backend's hand-written BPTT. The argument contract is in ``fusedrnn/reference.py``.

Custom ops cannot return None, so absent tensors (c for non-LSTM cells, the gradients of missing biases or
projections) cross the op boundary as empty tensors and are turned back into None on each side.
What autograd saves: the op's inputs, y and the activations the backend saved (``saved``; y doubles as the h
sequence). Where no gradient can follow (grad mode off, or nothing requires grad) ``run_layer`` asks for none
(``save=False``): the backend then skips writing them, which is most of inference's memory traffic.
The backward ops are differentiable too (double backward, on every device): by autograd through the
reference BPTT, which they recompute from the saved inputs. Autocast is registered on both forward ops for
CPU and CUDA, matching torch.nn's output dtypes (see the autocast section).
"""

import inspect
from collections import namedtuple
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from . import backend as backends
from . import reference
from .cells import LayerWeights, saved_shape

# The op's arguments of one layer's parameters, in LayerWeights' order (absent ones: None for the layer ops, empty
# lists for the stack ops); everything below names arguments through the ops' own signatures, never by position.
WEIGHTS = LayerWeights._fields
PRIMALS = ("x", "h0", "c0", *WEIGHTS)  # the inputs a gradient can flow to
COTANGENTS = ("dy", "dh_n", "dc_n")  # the backward ops' incoming gradients (dys for stacks)


def _arguments(op):
    """A named tuple of ``op``'s arguments in schema order, from its declared signature: the one place that fixes
    the order; defaults included, so a tuple autograd hands back without its trailing defaults still reads right."""
    params = inspect.signature(op._init_fn).parameters.values()
    defaults = [p.default for p in params if p.default is not inspect.Parameter.empty]
    return namedtuple(op._qualname.split("::")[1] + "_args", [p.name for p in params], defaults=defaults)


def _positions(args, names):
    return tuple(args._fields.index(name) for name in names)


def _gradients(args, **grads):
    """The tuple a backward formula returns: ``grads`` at their arguments' positions, None everywhere else."""
    return tuple(grads.get(name) for name in args._fields)


def _empty_like_none(t, like):
    return like.new_empty(0) if t is None else t


def _none_if_empty(t):
    return None if t is None or t.numel() == 0 and t.dim() == 1 else t


def _layer_weights(args):
    """The LayerWeights among an op's arguments (a layer op's: None where absent)."""
    return LayerWeights(*(getattr(args, name) for name in WEIGHTS))


def _named(args, names):
    """{name: value} of an op's arguments, to build another op's arguments by name (the op is then called with
    them positionally: a keyword call costs ~50 us in torch.library's fill_defaults under autograd)."""
    return {name: getattr(args, name) for name in names}


def _stack_weights(*columns):
    """The stack ops' weight arguments, one list per parameter in WEIGHTS order (empty where absent), as a list
    of LayerWeights."""
    return [LayerWeights(*(column[layer] if column else None for column in columns)) for layer in range(len(columns[0]))]


def _columns(weights):
    """A list of LayerWeights as the stack ops take them: per parameter, the list over layers (empty if absent)."""
    return {name: [w for w in column if w is not None] for name, column in zip(WEIGHTS, zip(*weights))}


# ---- one layer, one direction --------------------------------------------------------------------------------
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
    cell: str,
    reverse: bool,
    backend: str,
    save: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer, one direction, whole sequence. Returns (y, h_n, c_n or empty, saved; saved empty without save)."""
    y, h_n, c_n, saved = backends.get(backend).forward(
        cell, x, h0, c0, LayerWeights(w_ih, w_hh, b_ih, b_hh, w_hr), lengths, reverse, save
    )
    return y, h_n, _empty_like_none(c_n, x), saved


LayerForwardArgs = _arguments(layer_forward)


@layer_forward.register_fake
def _layer_forward_fake(*inputs):
    a = LayerForwardArgs(*inputs)
    (T, B), P, H = a.x.shape[:2], a.h0.shape[1], LayerWeights(a.w_ih, a.w_hh).hidden_size(a.cell)
    c_n = a.x.new_empty(B, H) if a.cell == "lstm" else a.x.new_empty(0)
    saved = a.x.new_empty(saved_shape(a.cell, T, B, H) if a.save else (0,))
    return a.x.new_empty(T, B, P), a.x.new_empty(B, P), c_n, saved


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
    saved: Tensor,
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Optional[Tensor],
    cell: str,
    reverse: bool,
    backend: str,
    need_dx: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BPTT of ``layer_forward``: the gradients of PRIMALS in order, empty where absent (dx too without need_dx: the
    layer's input needs no gradient, typically the data fed to the first layer)."""
    dx, dh0, dc0, dweights = backends.get(backend).backward(
        cell, x, h0, c0, LayerWeights(w_ih, w_hh, b_ih, b_hh, w_hr), lengths, reverse, y, saved, dy, dh_n, dc_n,
        need_dx,
    )
    return tuple(_empty_like_none(g, x) for g in (dx, dh0, dc0, *dweights))


LayerBackwardArgs = _arguments(layer_backward)


@layer_backward.register_fake
def _layer_backward_fake(*inputs):
    a = LayerBackwardArgs(*inputs)
    like = [getattr(a, name) for name in PRIMALS]
    like[0] = a.x if a.need_dx else None
    return tuple(a.x.new_empty(0) if t is None else torch.empty_like(t) for t in like)


def _save_inputs(ctx, inputs):
    """Save an op's whole input tuple (tensors, lists of tensors, None, strings, bools) for ``_saved_inputs``: the
    lists spread out (save_for_backward takes tensors and None) with their lengths kept. By hand, not pytree: this
    runs on every training forward, and pytree's flatten and unflatten cost ~10 us a layer."""
    leaves, ctx.list_lengths = [], []
    for item in inputs:
        is_list = isinstance(item, list)
        leaves.extend(item) if is_list else leaves.append(item)
        ctx.list_lengths.append(len(item) if is_list else None)
    ctx.save_for_backward(*[leaf if isinstance(leaf, Tensor) else None for leaf in leaves])
    ctx.other_leaves = [None if isinstance(leaf, Tensor) else leaf for leaf in leaves]


def _saved_inputs(ctx):
    leaves = iter([t if t is not None else o for t, o in zip(ctx.saved_tensors, ctx.other_leaves)])
    return [next(leaves) if n is None else [next(leaves) for _ in range(n)] for n in ctx.list_lengths]


def _setup_forward_context(ctx, inputs, output):
    """What a forward op's backward needs: its inputs and its (y or ys, saved) outputs."""
    outputs, _, _, saved = output
    _save_inputs(ctx, (*inputs, outputs, saved))
    ctx.set_materialize_grads(False)  # else autograd zero-fills a gradient for saved, a (T, B, .) buffer


def _restored(ctx, args):
    """(the forward op's arguments as ``args``, its y or ys, its saved) from _setup_forward_context."""
    *inputs, outputs, saved = _saved_inputs(ctx)
    a = args(*inputs)
    if not a.save:
        op = type(a).__name__.removesuffix("_args")
        raise RuntimeError(f"fusedrnn::{op} ran with save=False, so it kept nothing to differentiate")
    return a, outputs, saved


def _zero_filled(a, outputs, dy, dh_n, dc_n):
    """The cotangents of a forward op's outputs, zeros where autograd passed None (no gradient reached it)."""
    dy = torch.zeros_like(outputs) if dy is None else dy
    dh_n = torch.zeros_like(a.h0) if dh_n is None else dh_n
    if a.cell != "lstm":
        return dy, dh_n, None
    return dy, dh_n, torch.zeros_like(a.c0) if dc_n is None else dc_n


def _layer_forward_backward(ctx, dy, dh_n, dc_n, _dsaved):
    a, y, saved = _restored(ctx, LayerForwardArgs)
    dy, dh_n, dc_n = _zero_filled(a, y, dy, dh_n, dc_n)
    need_dx = ctx.needs_input_grad[0]
    grads = layer_backward(*LayerBackwardArgs(
        **_named(a, (*PRIMALS, "lengths", "cell", "reverse", "backend")), y=y, saved=saved, dy=dy, dh_n=dh_n,
        dc_n=dc_n, need_dx=need_dx,
    ))
    grads = dict(zip(PRIMALS, (_none_if_empty(g) for g in grads)))
    if not need_dx:
        grads["x"] = None
    return _gradients(LayerForwardArgs, **grads)


def _double_backward(ctx, *grad_grads):
    """Backward of a backward op (double backward, any backend): the reference BPTT, which is plain PyTorch,
    differentiated by autograd, with the forward's saved activations recomputed by the reference forward.

    ctx.differentiable: the input positions that can get a gradient (PRIMALS and COTANGENTS; y and saved are
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


def _setup_layer_backward_context(ctx, inputs, output):
    _save_inputs(ctx, inputs)
    ctx.differentiable = _positions(LayerBackwardArgs, (*PRIMALS, *COTANGENTS))
    ctx.set_materialize_grads(False)

    def recompute(inputs):
        a = LayerBackwardArgs(*inputs)
        weights = _layer_weights(a)
        y, _, _, saved = reference.forward(a.cell, a.x, a.h0, a.c0, weights, a.lengths, a.reverse)
        dx, dh0, dc0, dweights = reference.backward(
            a.cell, a.x, a.h0, a.c0, weights, a.lengths, a.reverse, y, saved, a.dy, a.dh_n, a.dc_n, a.need_dx
        )
        return dx, dh0, dc0, *dweights

    ctx.recompute = recompute


layer_forward.register_autograd(_layer_forward_backward, setup_context=_setup_forward_context)
layer_backward.register_autograd(_double_backward, setup_context=_setup_layer_backward_context)


class _LayerForwardEager(torch.autograd.Function):
    """``layer_forward`` under autograd in plain eager mode (where ``op_adds_nothing``): the op's own implementation,
    context and backward, the functions register_autograd registers above, without torch.library's autograd
    wrapper, which rebuilds the op's schema argument list once per argument on every call (~37 us a layer). The
    context is set inside forward, not in a setup_context method: with one, Function.apply binds every call's
    arguments through inspect.signature (~25 us)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = layer_forward._init_fn(*inputs)
        _setup_forward_context(ctx, inputs, output)
        return output

    backward = staticmethod(_layer_forward_backward)


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
    cell: str,
    backend: str,
    save: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """L unidirectional layers, dropout masks between them (reference.py's stack contract); the weights as one
    list per parameter (empty where absent). Returns (ys, h_n, c_n or empty, saved; saved empty without save)."""
    ys, h_n, c_n, saved = backends.get(backend).stack_forward(
        cell, x, h0, c0, _stack_weights(w_ih, w_hh, b_ih, b_hh, w_hr), masks, lengths, save
    )
    return ys, h_n, _empty_like_none(c_n, x), saved


StackForwardArgs = _arguments(stack_forward)


@stack_forward.register_fake
def _stack_forward_fake(*inputs):
    a = StackForwardArgs(*inputs)
    (T, B), (L, _, P) = a.x.shape[:2], a.h0.shape
    H = LayerWeights(a.w_ih[0], a.w_hh[0]).hidden_size(a.cell)
    c_n = a.x.new_empty(L, B, H) if a.cell == "lstm" else a.x.new_empty(0)
    saved = a.x.new_empty((L, *saved_shape(a.cell, T, B, H)) if a.save else (0,))
    return a.x.new_empty(L, T, B, P), a.x.new_empty(L, B, P), c_n, saved


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
    saved: Tensor,
    dys: Tensor,
    dh_n: Tensor,
    dc_n: Optional[Tensor],
    cell: str,
    backend: str,
    need_dx: bool = True,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """BPTT of ``stack_forward``: the gradients of PRIMALS in order; dx and dc0 empty where absent, the weight
    lists empty where their parameter lists are."""
    dx, dh0, dc0, dweights = backends.get(backend).stack_backward(
        cell, x, h0, c0, _stack_weights(w_ih, w_hh, b_ih, b_hh, w_hr), masks, lengths, ys, saved, dys, dh_n, dc_n,
        need_dx,
    )
    return (_empty_like_none(dx, x), dh0, _empty_like_none(dc0, x), *_columns(dweights).values())


StackBackwardArgs = _arguments(stack_backward)


@stack_backward.register_fake
def _stack_backward_fake(*inputs):
    a = StackBackwardArgs(*inputs)
    dx = torch.empty_like(a.x) if a.need_dx else a.x.new_empty(0)
    dc0 = a.x.new_empty(0) if a.c0 is None else torch.empty_like(a.c0)
    lists = ([torch.empty_like(t) for t in getattr(a, name)] for name in WEIGHTS)
    return dx, torch.empty_like(a.h0), dc0, *lists


def _stack_forward_backward(ctx, dys, dh_n, dc_n, _dsaved):
    a, ys, saved = _restored(ctx, StackForwardArgs)
    dys, dh_n, dc_n = _zero_filled(a, ys, dys, dh_n, dc_n)
    need_dx = ctx.needs_input_grad[0]
    dx, dh0, dc0, *lists = stack_backward(*StackBackwardArgs(
        **_named(a, (*PRIMALS, "masks", "lengths", "cell", "backend")), ys=ys, saved=saved, dys=dys, dh_n=dh_n,
        dc_n=dc_n, need_dx=need_dx,
    ))
    grads = _gradients(StackForwardArgs, x=dx if need_dx else None, h0=dh0, c0=_none_if_empty(dc0),
                       **dict(zip(WEIGHTS, lists)), masks=[None] * len(a.masks))
    return grads[: len(ctx.needs_input_grad)]  # trailing arguments left at their defaults take no slot


def _setup_stack_backward_context(ctx, inputs, output):
    _save_inputs(ctx, inputs)
    ctx.differentiable = _positions(StackBackwardArgs, (*PRIMALS, "dys", "dh_n", "dc_n"))
    ctx.set_materialize_grads(False)

    def recompute(inputs):
        a = StackBackwardArgs(*inputs)
        weights = _stack_weights(*(getattr(a, name) for name in WEIGHTS))
        ys, _, _, saved = reference.stack_forward(a.cell, a.x, a.h0, a.c0, weights, a.masks, a.lengths)
        dx, dh0, dc0, dweights = reference.stack_backward(
            a.cell, a.x, a.h0, a.c0, weights, a.masks, a.lengths, ys, saved, a.dys, a.dh_n, a.dc_n, a.need_dx
        )
        return dx, dh0, dc0, *_columns(dweights).values()

    ctx.recompute = recompute


stack_forward.register_autograd(_stack_forward_backward, setup_context=_setup_forward_context)
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


def _autocast_kernel(op, args_type, device_type):
    """``op``'s autocast kernel; args_type names its arguments (``_arguments``)."""

    def kernel(*args):
        low = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t.to(low) if isinstance(t, Tensor) and _autocasts(t, device_type) else t

        low_args = [[cast(t) for t in a] if isinstance(a, list) else cast(a) for a in args]
        with torch.autocast(device_type, enabled=False):
            y, h_n, c_n, saved = op(*low_args)
        a = args_type(*args)
        if device_type == "cpu" and a.cell == "gru":
            state = torch.promote_types(low, a.h0.dtype)
            y, h_n = y.to(state), h_n.to(state)
        if device_type == "cpu" and a.w_hr is not None and not (isinstance(a.w_hr, list) and not a.w_hr):
            c_n = c_n.to(torch.promote_types(low, a.c0.dtype))
        return y, h_n, c_n, saved

    return kernel


for _device_type in _AUTOCAST_DEVICES:
    for _op, _args_type in ((layer_forward, LayerForwardArgs), (stack_forward, StackForwardArgs)):
        _kernel = _autocast_kernel(_op, _args_type, _device_type)
        torch.library.impl(_op._qualname, "Autocast" + _device_type.upper(), _kernel)


def op_adds_nothing(x, tensors):
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


def grad_can_follow(tensors):
    """Whether a gradient can flow from a call on ``tensors`` (None allowed): grad mode on and one requires grad.
    A list, not a generator: Dynamo refused generator expressions here after test_compile.py's graph breaks."""
    return torch.is_grad_enabled() and any([t is not None and t.requires_grad for t in tensors])


def run_layer(x, h0, c0, weights, lengths, cell, reverse, backend):
    """Differentiable (y, h_n, c_n or None) for one layer-direction; weights: LayerWeights; see the contract in
    reference.py."""
    tensors = (x, h0, c0, *weights, lengths)
    save = grad_can_follow(tensors)
    # The op takes x, h0, c0, then the weights in LayerWeights order (checked at import below).
    if not op_adds_nothing(x, tensors):
        y, h_n, c_n, _ = layer_forward(*tensors, cell, reverse, backend, save)
    elif save:
        y, h_n, c_n, _ = _LayerForwardEager.apply(*tensors, cell, reverse, backend, save)
    else:
        y, h_n, c_n, _ = backends.get(backend).forward(cell, x, h0, c0, weights, lengths, reverse, False)
    return y, h_n, (c_n if cell == "lstm" else None)


def run_stack(x, h0, c0, weights, masks, lengths, cell, backend):
    """Differentiable (y, h_n, c_n or None) of a unidirectional stack in one call (the stack contract in
    reference.py). weights: a LayerWeights per layer, every layer with the same parameters present; masks: the
    dropout masks between layers (empty list without dropout)."""
    columns = _columns(weights)
    tensors = (x, h0, c0, *(w for column in columns.values() for w in column))
    save = grad_can_follow(tensors)
    if not save and op_adds_nothing(x, (*tensors, *masks, lengths)):
        ys, h_n, c_n, _ = backends.get(backend).stack_forward(cell, x, h0, c0, weights, masks, lengths, False)
    else:
        ys, h_n, c_n, _ = stack_forward(x, h0, c0, *columns.values(), masks, lengths, cell, backend, save)
    return ys[-1].clone(), h_n, (c_n if cell == "lstm" else None)  # y not a view of ys, like torch.nn's output


for _args_type in (LayerForwardArgs, LayerBackwardArgs, StackForwardArgs, StackBackwardArgs):
    # run_layer / run_stack / the ops pass the weights positionally after x, h0, c0: keep them declared so.
    assert _args_type._fields[: len(PRIMALS)] == PRIMALS, _args_type._fields
