"""CUDA C++ backend: persistent fused recurrences (fusedrnn/csrc/cuda), one call per layer-direction or
unidirectional stack.

The contract (shapes, lengths' hold rule, what ``saved`` holds) is fusedrnn/reference.py's. The compiled module is
``fusedrnn._cuda`` (built by setup.py when torch has CUDA and nvcc is present), else the same sources, installed
with the package, built on first use with torch.utils.cpp_extension.load and ninja (cached by torch in
``TORCH_EXTENSIONS_DIR``, default ~/.cache/torch_extensions); sources and flags: fusedrnn/toolchain.py. A missing or
broken build makes ``unavailable_reason`` say why and how to fix it; it never raises.

How the recurrence runs (csrc/cuda/recurrence.cuh): one cooperative kernel per sequence with the recurrent
weights split over the thread blocks and held in shared memory ("persistent"), or, where they do not fit
on chip, one launch per step reading them from global memory ("per_step"). A unidirectional stack runs as
one wavefront (layer l at step t alongside layer l + 1 at step t - 1: T + L - 1 steps, not L * T).
A third scheme, "gemm", runs one layer per call: per step the recurrent product as an ATen GEMM (tensor cores
through cuBLAS, torch's TF32 settings) and one fused pointwise kernel (csrc/cuda/gemm_step.cuh), for large B or H.
``SCHEME`` (FUSEDRNN_CUDA_SCHEME) forces one (tests, benchmarks); "auto" asks fusedrnn/planner.py's cost model,
with the launcher's exact occupancy query deciding whether persistent fits. ``POISON`` (tests) fills every
buffer the kernels write with NaN first, so an element a kernel never wrote shows up as NaN.
Around the recurrence, everything that is not sequential is fusedrnn/epilogue.py's: the input projection before it,
and after the BPTT kernels (which return the gate gradients) dx and the weights' gradients.
"""

import dataclasses
import functools
import os

import torch

from . import planner, reference, toolchain
from .cells import LayerWeights
from .epilogue import input_projection, layer_input, previous, weight_grads

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCHEMES = ("auto", "persistent", "per_step", "gemm")
SCHEME = os.environ.get("FUSEDRNN_CUDA_SCHEME", "auto")
POISON = False
_FIX = (
    "reinstall with a CUDA build of torch and its nvcc on PATH (FUSEDRNN_BUILD_CUDA=1 pip install "
    "--no-build-isolation -e .), or keep nvcc + ninja available for the build on first use"
)


def _jit_build():
    from torch.utils import cpp_extension

    spec = toolchain.CUDA
    if not spec.sources():
        raise FileNotFoundError(f"{toolchain.CSRC / 'cuda'} has no sources (an install without fusedrnn/csrc)")
    if toolchain.configure(cpp_extension) is None:
        raise FileNotFoundError("no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset, no /usr/local/cuda)")
    return cpp_extension.load(
        name=spec.jit_name,
        sources=spec.sources(),
        extra_cflags=list(spec.cxx_flags),
        extra_cuda_cflags=list(spec.nvcc_flags),
        verbose=os.environ.get("FUSEDRNN_VERBOSE_BUILD") == "1",
    )


@functools.cache
def _load():
    """(module, None), or (None, why it cannot be loaded, with the fix). Tried once per process."""
    try:
        from . import _cuda

        return _cuda, None
    except ImportError as e:
        aot = f"fusedrnn._cuda: {e}"
    try:
        return _jit_build(), None
    except Exception as e:  # noqa: BLE001 - any build failure becomes the reason string
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        built = f"building it failed ({type(e).__name__}: {first})"
        return None, f"the CUDA extension is not built ({aot}) and {built}; {_FIX}"


def _ext():
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"fusedrnn cuda backend: {reason}")
    return module


def unavailable_reason(device, dtype, cell):
    """Why this backend cannot run (device type, dtype, cell), or None. Loads or builds the extension."""
    if device != "cuda":
        return f"needs a CUDA device (the tensors are on {device}); use backend 'cpp' or 'reference' there"
    if torch.version.cuda is None:
        return "this torch build has no CUDA support; install a CUDA build of torch"
    if dtype not in DTYPES:
        return f"{dtype} is not supported (float32, float16, bfloat16); use backend 'reference' for it"
    if SCHEME not in SCHEMES:
        return f"FUSEDRNN_CUDA_SCHEME must be one of {SCHEMES}, got {SCHEME!r}"
    if not torch.cuda.is_available():  # before loading: without a card, a first-use build would be for nothing
        return "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
    return _load()[1]


def forward(cell, x, h0, c0, weights, lengths, reverse, save=True):
    scheme = _plan(cell, x, weights, 1, backward=False).scheme
    gx = input_projection(x, weights.w_ih, weights.b_ih)
    return _ext().forward(cell, gx, h0, c0, weights, lengths, reverse, save, scheme, POISON)


def backward(cell, x, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n, need_dx=True):
    scheme = _plan(cell, x, weights, 1, backward=True).scheme
    dgx, dgh, dhy, dh0, dc0 = _ext().backward(cell, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n,
                                              scheme, POISON)
    h_prev = previous(y, h0, reverse)
    dx, dweights = weight_grads(cell, x, h_prev, saved, weights, dgx, dgx if dgh is None else dgh, dhy, need_dx)
    return dx, dh0, dc0, dweights


def _plan(cell, x, weights, layers, backward):
    """The plan of a call on `layers` layers (x: (T, B, I); weights: one layer's LayerWeights, or a list of them):
    the scheme FUSEDRNN_CUDA_SCHEME forces (a stack then runs one wavefront, except gemm and stacks deeper than one
    launch, which go layer by layer), else the planner's choice among the CUDA schemes. Reads shapes only: no sync."""
    first = weights if isinstance(weights, LayerWeights) else weights[0]
    T, B, I = x.shape
    H, P, proj = first.hidden_size(cell), first.w_hh.shape[1], first.w_hr is not None
    too_deep = layers > _ext().max_layers
    if SCHEME != "auto":
        return planner.Plan("cuda", SCHEME, layers > 1 and (too_deep or SCHEME == "gemm"), {})
    tf32 = torch.backends.cuda.matmul.allow_tf32
    chosen = _planned(cell, x.dtype, x.device, T, B, I, H, P, min(layers, _ext().max_layers), proj, backward, tf32)
    return dataclasses.replace(chosen, by_layers=chosen.by_layers or too_deep)


def planned_backend(cell, x, dtype, H, P, layers):
    """"cuda" or "triton": the planner's choice between the GPU backends for a forward of x: (T, B, I) through
    `layers` layers of H units and P outputs (H without proj_size) in `dtype`. Shapes and cached device properties
    only: no sync. Cached like _planned."""
    T, B, I = x.shape
    tf32 = torch.backends.cuda.matmul.allow_tf32
    return _planned_backend(cell, dtype, x.device, T, B, I, H, P, min(layers, _ext().max_layers), tf32)


@functools.lru_cache(maxsize=4096)
def _planned_backend(cell, dtype, device, T, B, I, H, P, layers, tf32):
    shape = planner.Shape.of(cell, T, B, I, H, P, layers, dtype, tf32)
    fits = functools.partial(_fits_on_chip, cell, dtype, device, H, P, proj=P != H, backward=False)
    return planner.plan(shape, planner.Device.of(device), fits=fits).backend


@functools.lru_cache(maxsize=4096)
def _planned(cell, dtype, device, T, B, I, H, P, layers, proj, backward, tf32):
    """planner.plan among the CUDA schemes, with the launcher's exact answer to whether persistent fits. Cached:
    a training step asks four times on a latency-bound path. tf32: torch.backends.cuda.matmul.allow_tf32."""
    shape = planner.Shape.of(cell, T, B, I, H, P, layers, dtype, tf32)
    fits = functools.partial(_fits_on_chip, cell, dtype, device, H, P, proj=proj, backward=backward)
    return planner.plan(shape, planner.Device.of(device), fits=fits, backends=("cuda",))


@functools.lru_cache(maxsize=1024)
def _fits_on_chip(cell, dtype, device, H, P, layers, proj, backward):
    """Whether such a stack runs persistent. Cached: a plan query is several CUDA API calls (device
    attributes, occupancy), and a training step asks four times, on a latency-bound path."""
    return _ext().fits_on_chip(cell, torch.empty(0, dtype=dtype, device=device), H, P, layers, proj, backward)


def stack_forward(cell, x, h0, c0, weights, masks, lengths, save=True):
    """A unidirectional stack (reference.py's stack contract), as one wavefront launch where the plan says so:
    layer l runs step t while layer l + 1 runs step t - 1; else layer by layer, each layer planned alone."""
    chosen = _plan(cell, x, weights, len(weights), backward=False)
    if chosen.by_layers:
        return reference.stack_forward_by_layers(forward, cell, x, h0, c0, weights, masks, lengths, save)
    gx = input_projection(x, weights[0].w_ih, weights[0].b_ih)
    return _ext().stack_forward(cell, gx, h0, c0, weights, masks, lengths, False, save, chosen.scheme, POISON)


def stack_backward(cell, x, h0, c0, weights, masks, lengths, ys, saved, dys, dh_n, dc_n, need_dx=True):
    """The stack's BPTT: one wavefront in reverse for the gate gradients (or layer by layer, as the plan says),
    then the epilogue per layer (fusedrnn/epilogue.py); only layer 0's dx is computed (the wavefront passed every
    other layer's input gradient down on chip)."""
    chosen = _plan(cell, x, weights, len(weights), backward=True)
    if chosen.by_layers:
        return reference.stack_backward_by_layers(backward, cell, x, h0, c0, weights, masks, lengths, ys, saved, dys,
                                                  dh_n, dc_n, need_dx)
    dgx, dgh, dhy, dh0, dc0 = _ext().stack_backward(cell, h0, c0, weights, masks, lengths, False, ys, saved, dys,
                                                    dh_n, dc_n, chosen.scheme, POISON)
    dx, dweights = None, []
    for layer, layer_weights in enumerate(weights):
        h_prev = previous(ys[layer], h0[layer], False)
        layer_dx, grads = weight_grads(
            cell, layer_input(x, ys, masks, layer), h_prev, saved[layer], layer_weights, dgx[layer],
            dgx[layer] if dgh is None else dgh[layer], None if dhy is None else dhy[layer], need_dx and layer == 0,
        )
        dx = layer_dx if layer == 0 else dx
        dweights.append(grads)
    return dx, dh0, dc0, dweights


def last_scheme():
    """"persistent", "per_step" or "gemm": how the last forward or backward call in this process ran."""
    return _ext().last_scheme()
