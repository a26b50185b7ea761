"""The C++ CPU backend ("cpp"): fused per-step kernels and hand-written BPTT for one layer-direction.

The kernels live in ``csrc/cpu`` (the math and the threading are described at the top of
``csrc/cpu/recurrence.h``). They are loaded from ``fusedrnn._cpp``, the extension ``setup.py`` builds
ahead of time; failing that, they are built on first use with ``torch.utils.cpp_extension.load`` (ninja,
cached under torch's extension directory, so only the first process pays). When neither works,
``unavailable_reason`` says why and how to fix it: asking for ``backend="cpp"`` raises with that text and
``auto`` warns once and uses the reference backend.

dtypes: float32 and float64 natively; bfloat16 runs in float32 (math and accumulation) on tensors promoted
from bfloat16, with the results rounded back, on any x86-64 CPU.

Contract: ``fusedrnn/reference.py``. ws is (T, B, 5H) for lstm = activated i, f, g, o and c_t (held), (T, B, 4H)
for gru = r, z, n and h W_hn^T + b_hn, (T, B, 0) for rnn: the same shape as the reference's, but private to
this backend's backward. Nothing aliases: every output is a fresh tensor.
"""

import functools
import os
from pathlib import Path

import torch

from .reference import workspace_shape

__all__ = ["backward", "forward", "unavailable_reason", "workspace_shape"]

SOURCE_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cpu"
JIT_NAME = "fusedrnn_cpp"
JIT_CFLAGS = ["-O3", "-fopenmp"]  # keep in step with setup.py's CppExtension
VERBOSE_ENV = "FUSEDRNN_VERBOSE_BUILD"
_NATIVE = (torch.float32, torch.float64)
_SUPPORTED = (*_NATIVE, torch.bfloat16)


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _build():
    """Compile csrc/cpu/*.cpp with ninja into torch's extension cache and import it."""
    from torch.utils import cpp_extension

    sources = sorted(str(p) for p in SOURCE_DIR.glob("*.cpp"))
    if not sources:
        raise FileNotFoundError(f"no C++ sources in {SOURCE_DIR} (an installed wheel without the extension)")
    cpp_extension.verify_ninja_availability()
    return cpp_extension.load(
        name=JIT_NAME,
        sources=sources,
        extra_cflags=JIT_CFLAGS,
        extra_ldflags=["-fopenmp"],
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


def unavailable_reason(device, dtype, mode):
    """Why this backend cannot run (device, dtype, mode), or None. Builds the extension on first call."""
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


def _in_compute_dtype(fn, args):
    """fn(*args) with bfloat16 tensors promoted to float32, the results rounded back to bfloat16."""
    low = args[1].dtype  # x
    if low in _NATIVE:
        return fn(*args)
    up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    return tuple(None if r is None else r.to(low) for r in fn(*up))


def forward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save=True):
    """One layer, one direction: (y, h_n, c_n, ws); shapes in fusedrnn/reference.py (ws empty without save)."""
    args = (mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save)
    return _in_compute_dtype(_module().forward, args)


def backward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, ws, dy, dh_n, dc_n, need_dx=True):
    """BPTT of ``forward``: (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr), None where absent (dx without
    need_dx: it is then not computed)."""
    args = (mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, ws, dy, dh_n, dc_n, need_dx)
    return _in_compute_dtype(_module().backward, args)
