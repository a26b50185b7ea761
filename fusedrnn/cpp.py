"""The C++ CPU backend ("cpp"): fused per-step kernels and hand-written BPTT for one layer-direction.

The kernels live in ``fusedrnn/csrc/cpu`` (api.h: what the binding sees; forward.h, backward.h: the layer drivers and
how they thread; split.h: the scheduling heuristics). They are loaded from ``fusedrnn._cpp``, the extension
``setup.py`` builds ahead of time; failing that, they are built on first use with ``torch.utils.cpp_extension.load``
(ninja, cached under torch's extension directory, so only the first process pays), from the sources installed with
the package and the flags of ``fusedrnn/toolchain.py``. When neither works, ``unavailable_reason`` says why and how
to fix it: asking for ``backend="cpp"`` raises with that text and ``auto`` warns once and uses the reference backend.

dtypes: float32 and float64 natively; bfloat16 runs in float32 (math and accumulation) on tensors promoted
from bfloat16, with the results rounded back, on any x86-64 CPU.

Contract: ``fusedrnn/reference.py`` (``saved`` in the layout of ``cells.saved_shape``). The weight gradients come from
the C++ driver's own fused epilogue, which follows ``fusedrnn/epilogue.py``'s row-block rule (tests/test_cpp.py pins
it). Nothing aliases: every output is a fresh tensor.
"""

import functools
import os

import torch

from . import reference, toolchain
from .cells import LayerWeights

__all__ = ["backward", "forward", "inference", "unavailable_reason"]

VERBOSE_ENV = "FUSEDRNN_VERBOSE_BUILD"
_NATIVE = (torch.float32, torch.float64)
_SUPPORTED = (*_NATIVE, torch.bfloat16)


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _build():
    """Compile fusedrnn/csrc/cpu with ninja into torch's extension cache and import it."""
    from torch.utils import cpp_extension

    spec = toolchain.CPU
    sources = spec.sources()
    if not sources:
        raise FileNotFoundError(f"no C++ sources in {toolchain.CSRC / 'cpu'} (an install without fusedrnn/csrc)")
    cpp_extension.verify_ninja_availability()
    return cpp_extension.load(
        name=spec.jit_name,
        sources=sources,
        extra_cflags=list(spec.cxx_flags),
        extra_ldflags=list(spec.ld_flags),
        verbose=os.environ.get(VERBOSE_ENV, "0") == "1",
    )


@functools.cache
def _extension():
    """(module, None) or (None, why it cannot be had and how to fix that)."""
    try:
        from . import _cpp

        return _cpp, None
    except ImportError as error:
        aot_error = _first_line(error)
    try:
        return _build(), None
    except Exception as error:  # noqa: BLE001 - any build failure becomes the backend's reason, never an import error
        return None, (
            f"the C++ extension is not built (import fusedrnn._cpp: {aot_error}) and building it failed "
            f"({type(error).__name__}: {_first_line(error)}); install a C++ compiler and ninja, then "
            f"`pip install --no-build-isolation -e .` (set {VERBOSE_ENV}=1 to see the compiler output)"
        )


def unavailable_reason(device, dtype, cell):
    """Why this backend cannot run (device, dtype, cell), or None. Builds the extension on first call."""
    if torch.device(device).type != "cpu":
        return f"it runs on the CPU only, not on {device}"
    if dtype not in _SUPPORTED:
        return f"{dtype} is not supported (float32, float64 and bfloat16 are)"
    return _extension()[1]


def _module():
    module, reason = _extension()
    if module is None:
        raise RuntimeError(f"fusedrnn: the 'cpp' backend is unavailable: {reason}")
    return module


def _promoted(value):
    """bfloat16 tensors (also inside a LayerWeights or a list) as float32; anything else as it is."""
    if isinstance(value, LayerWeights):
        return LayerWeights(*(_promoted(w) for w in value))
    if isinstance(value, list):
        return [_promoted(w) for w in value]
    if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
        return value.float()
    return value


def _rounded(value, dtype):
    if isinstance(value, tuple):
        return tuple(_rounded(v, dtype) for v in value)
    return None if value is None else value.to(dtype)


def _in_compute_dtype(fn, x, args):
    """fn(*args), with bfloat16 tensors promoted to float32 and the results rounded back, when x is bfloat16."""
    if x.dtype in _NATIVE:
        return fn(*args)
    return _rounded(fn(*(_promoted(a) for a in args)), x.dtype)


def forward(cell, x, h0, c0, weights, lengths, reverse, save=True):
    """One layer, one direction: (y, h_n, c_n, saved); shapes in fusedrnn/reference.py (saved empty without save)."""
    return _in_compute_dtype(_module().forward, x, (cell, x, h0, c0, weights, lengths, reverse, save))


def inference(cell, x, hx, cx, weights, has_biases, num_layers, bidirectional, lengths):
    """A module's whole forward with nothing to differentiate, in one C++ call: (y, h_n, c_n); reference.py's
    inference contract (weights: torch.nn's flat list). bfloat16 runs layer by layer instead, each layer's output
    rounded as the training path rounds it, so that no_grad and grad give the same numbers."""
    args = (cell, x, hx, cx, weights, has_biases, num_layers, bidirectional, lengths)
    if x.dtype not in _NATIVE:
        return reference.inference_by_layers(forward, *args)
    return _module().inference(*args)


def backward(cell, x, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n, need_dx=True):
    """BPTT of ``forward``: (dx, dh0, dc0, LayerWeights of the weights' gradients), None where absent (dx without
    need_dx: it is then not computed)."""
    args = (cell, x, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n, need_dx)
    dx, dh0, dc0, dweights = _in_compute_dtype(_module().backward, x, args)
    return dx, dh0, dc0, LayerWeights(*dweights)
