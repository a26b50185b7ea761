"""Which backend runs a layer: the module's ``backend=`` argument, else ``FUSEDRNN_BACKEND``, else "auto".

A backend asked for by name runs or raises (RuntimeError naming the cause and the fix). "auto" takes the
first backend of the device's preference list that can run the (device, dtype, cell); when it has to pass
over a faster one it warns once, saying why.

Each backend is a module exposing ``forward`` and ``backward`` (see ``fusedrnn/reference.py`` for the
contract) and ``unavailable_reason(device, dtype, cell) -> str | None``;
importing it must be cheap and never fail (extensions load lazily, on the first ``unavailable_reason``).
"""

import importlib
import os
import sys
import warnings

import torch

NAMES = ("reference", "cpp", "triton", "cuda")
ENV_VAR = "FUSEDRNN_BACKEND"
_MODULES = {
    "reference": "fusedrnn.reference",
    "cpp": "fusedrnn.cpp",
    "triton": "fusedrnn.triton",
    "cuda": "fusedrnn.cuda",
}
# Fastest first. Triton runs on CPU tensors only under TRITON_INTERPRET=1, a testing aid: never automatic.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
_warned = set()


def check_name(name):
    """Validate a backend name given by the user; returns it."""
    if name != "auto" and name not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {name!r}")
    return name


def get(name):
    """The backend module called ``name`` (imported on first use)."""
    module = sys.modules.get(_MODULES[name])  # import_module's own lookup costs ~1.5 us of a ~50 us small call
    return module if module is not None else _first_import(_MODULES[name])


def _first_import(path):
    """importlib.import_module(path), with Dynamo's frame hook off where Dynamo is loaded: the backend choice runs
    at trace time under torch.compile, and a first import there had Dynamo look at every frame the import ran; under
    fullgraph a generator among them failed the compile ("Attempt to trace generator") instead of the call going on
    or raising the backend's own error."""
    dynamo = sys.modules.get("torch._dynamo")
    return importlib.import_module(path) if dynamo is None else dynamo.disable(importlib.import_module)(path)


# The backends whose modules implement reference.py's stack contract (a unidirectional stack in one call);
# a constant, not a module lookup, so that torch.compile traces the choice (tests check it against the modules).
STACK_BACKENDS = ("reference", "cuda")


def runs_stacks(name):
    return name in STACK_BACKENDS


# The backends whose modules implement reference.py's inference contract (a module's whole no-grad forward in one
# call); a constant for the same reason (tests check it against the modules).
INFERENCE_BACKENDS = ("reference", "cpp")


def runs_inference(name):
    return name in INFERENCE_BACKENDS


def _reason(name, device_type, dtype, cell):
    try:
        return get(name).unavailable_reason(device_type, dtype, cell)
    except ImportError as e:  # a backend whose Python dependencies are missing (e.g. no triton)
        return f"cannot import it ({e})"


def available_backends(device=None):
    """Names of the backends that can run on ``device`` (default: CUDA when present, else CPU) in float32."""
    device_type = torch.device(device).type if device is not None else _default_device_type()
    return [n for n in NAMES if _reason(n, device_type, torch.float32, "lstm") is None]


def _default_device_type():
    return "cuda" if torch.cuda.is_available() else "cpu"


def requested(module_choice):
    """The effective request: the module's argument unless it is "auto", then the environment."""
    if module_choice != "auto":
        return module_choice
    return check_name(os.environ.get(ENV_VAR, "auto") or "auto")


def _constant_under_compile(fn):
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo (about 1.2 s, and triton)
    at ``import fusedrnn``: that decorator only sets this marker, which Dynamo reads when it traces a call.
    tests/test_compile.py checks that the marker is still the one torch sets."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def choose(module_choice, device_type, dtype, cell):
    """``resolve(requested(module_choice), ...)``. Under torch.compile it runs once, at trace time, and its
    result is a constant of the graph (environment reads, imports and warnings stay out of the trace); the
    module's choice, device and dtype are guarded, FUSEDRNN_BACKEND is not: set it before compiling.

    Not kept between calls: resolving costs ~1 us (with ``get`` a dict lookup), and a kept answer could outlive
    what it was based on (a backend's cached verdict is reset, as the tests do to simulate a broken build)."""
    return resolve(requested(module_choice), device_type, dtype, cell)


def planned_on_gpu(module_choice, cell, x, dtype, hidden_size, proj_size, layers):
    """The backend for a call that ``auto`` gave to "cuda": the planner's pick between the two GPU backends for
    this shape (fusedrnn/planner.py) where Triton can run it too, else "cuda". A backend asked for by name (the
    module's argument or FUSEDRNN_BACKEND) is kept. x: (T, B, I) on a CUDA device; proj_size: 0 for none;
    layers: of a unidirectional stack, 1 for layer-by-layer calls. Eager only: under torch.compile the choice stays
    the traced constant."""
    if requested(module_choice) != "auto" or _reason("triton", x.device.type, dtype, cell) is not None:
        return "cuda"
    return get("cuda").planned_backend(cell, x, dtype, hidden_size, proj_size or hidden_size, layers)


def resolve(choice, device_type, dtype, cell):
    """The backend name that runs (device_type, dtype, cell) for a request ``choice``."""
    if choice != "auto":
        reason = _reason(choice, device_type, dtype, cell)
        if reason is not None:
            raise RuntimeError(
                f"fusedrnn: backend {choice!r} cannot run {cell} in {dtype} on {device_type}: {reason}. "
                f"Pick another with backend=... or {ENV_VAR}, or 'auto' to choose automatically."
            )
        return choice
    skipped = []
    for name in _AUTO_ORDER.get(device_type, ("reference",)):
        reason = _reason(name, device_type, dtype, cell)
        if reason is None:
            _warn_fallback(skipped, name, device_type, dtype, cell)
            return name
        skipped.append((name, reason))
    raise RuntimeError(f"fusedrnn: no backend can run {cell} in {dtype} on {device_type}")


def _warn_fallback(skipped, chosen, device_type, dtype, cell):
    key = (tuple(skipped), chosen, device_type)
    if not skipped or key in _warned:
        return
    _warned.add(key)
    why = "; ".join(f"{n}: {r}" for n, r in skipped)
    warnings.warn(
        f"fusedrnn: using the {chosen!r} backend for {cell} in {dtype} on {device_type} ({why})",
        RuntimeWarning,
        stacklevel=5,  # _warn_fallback < resolve < choose < _run < forward
    )
