"""Fallbacks when a backend's dependency is missing or its extension cannot be built or loaded (simulated).

``auto`` must still run correctly and warn exactly once, naming the backend it passed over and why; a
backend asked for by name (argument or FUSEDRNN_BACKEND) must raise a RuntimeError naming the cause and
the fix. The breakage is simulated with monkeypatch: the backend module is re-imported with the
prebuilt extension unimportable and torch.utils.cpp_extension's build failing, or with ``triton``
unimportable; everything is restored afterwards.
"""

import sys
import warnings

import pytest
import torch
from conftest import check_oracle, make_pair, random_hx, random_input
from torch.utils import cpp_extension

import fusedrnn
from fusedrnn import backend as backends

SIMULATED = "simulated failure for test_fallbacks"


def _forget(monkeypatch, name):
    """Drop module ``name`` and its submodules from sys.modules and from their parents' attributes, so the
    next import runs afresh (monkeypatch restores all of it)."""
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        parent, _, child = loaded.rpartition(".")
        if parent in sys.modules:
            monkeypatch.delattr(sys.modules[parent], child, raising=False)
        monkeypatch.delitem(sys.modules, loaded)


def _fail(*args, **kwargs):
    raise RuntimeError(SIMULATED)


def _break_extension(monkeypatch, backend, step):
    """Make backend ``backend``'s compiled extension unloadable and its build on first use fail at ``step``
    (a torch.utils.cpp_extension function); the backend module is re-imported under that."""
    _forget(monkeypatch, f"fusedrnn.{backend}")
    _forget(monkeypatch, f"fusedrnn._{backend}")
    monkeypatch.setitem(sys.modules, f"fusedrnn._{backend}", None)  # "import fusedrnn._cpp" fails
    monkeypatch.setattr(cpp_extension, step, _fail)
    monkeypatch.setattr(backends, "_warned", set())


def _break_triton(monkeypatch):
    _forget(monkeypatch, "fusedrnn.triton")
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(backends, "_warned", set())


def _forward_backward(model, T=4, B=3):
    x = torch.randn(T, B, model.input_size, device=model.weight_ih_l0.device, requires_grad=True)
    y, _ = model(x)
    y.sum().backward()


def _fallback_warnings(model, runs=2):
    """The fusedrnn fallback warnings emitted over ``runs`` forward + backward passes (never deduplicated by
    Python's registry, so only fusedrnn's own warn-once logic can keep the count at one)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(runs):
            _forward_backward(model)
    return [str(w.message) for w in caught if "fusedrnn" in str(w.message)]


@pytest.mark.parametrize("step", ["load", "verify_ninja_availability"])
def test_cpp_broken_auto_falls_back_with_one_warning(monkeypatch, step):
    _break_extension(monkeypatch, "cpp", step)
    assert "cpp" not in fusedrnn.available_backends("cpu")
    fused, ref = make_pair("lstm", 3, 5, "auto", num_layers=2)
    messages = _fallback_warnings(fused)
    assert len(messages) == 1, messages
    assert "'reference'" in messages[0] and "cpp" in messages[0] and SIMULATED in messages[0]
    assert fused.last_backend == "reference"
    check_oracle(fused, ref, random_input(5, 2, 3), random_hx("lstm", 2, 2, 5))


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_cpp_broken_by_name_raises_cause_and_fix(monkeypatch, how):
    _break_extension(monkeypatch, "cpp", "load")
    if how == "environment":
        monkeypatch.setenv(backends.ENV_VAR, "cpp")
    model = fusedrnn.GRU(3, 4, backend="cpp" if how == "argument" else "auto")
    with pytest.raises(RuntimeError) as error:
        model(torch.randn(2, 1, 3))
    message = str(error.value)
    assert "'cpp'" in message and SIMULATED in message  # the cause
    assert "pip install" in message  # the fix


def test_triton_missing_by_name_raises_cause_and_fix(monkeypatch):
    _break_triton(monkeypatch)
    assert "triton" not in fusedrnn.available_backends("cpu")
    with pytest.raises(RuntimeError, match=r"(?s)'triton'.*import.*pip install triton"):
        fusedrnn.LSTM(3, 4, backend="triton")(torch.randn(2, 1, 3))


def test_triton_missing_auto_on_cpu_is_silent(monkeypatch):
    """Triton is not in the CPU's automatic order, so its absence changes nothing there."""
    _break_triton(monkeypatch)
    fused, ref = make_pair("gru", 3, 5, "auto")
    assert not [m for m in _fallback_warnings(fused) if "triton" in m]
    assert fused.last_backend in fusedrnn.available_backends("cpu")
    check_oracle(fused, ref, random_input(4, 2, 3), random_hx("gru", 1, 2, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_broken_and_triton_missing_auto_on_gpu(monkeypatch, cell):
    """Both GPU kernels gone: auto runs the reference on the GPU with one warning naming both causes."""
    _break_extension(monkeypatch, "cuda", "load")
    _break_triton(monkeypatch)
    fused, ref = make_pair(cell, 3, 5, "auto", device="cuda")
    messages = _fallback_warnings(fused)
    assert len(messages) == 1 and "cuda" in messages[0] and "triton" in messages[0], messages
    assert fused.last_backend == "reference"
    check_oracle(fused, ref, random_input(4, 2, 3), random_hx(cell, 1, 2, 5), device="cuda")


@pytest.mark.gpu
def test_cuda_broken_by_name_raises_cause_and_fix(monkeypatch):
    _break_extension(monkeypatch, "cuda", "load")
    with pytest.raises(RuntimeError, match=rf"(?s)'cuda'.*{SIMULATED}.*pip install"):
        fusedrnn.LSTM(3, 4, backend="cuda", device="cuda")(torch.randn(2, 1, 3, device="cuda"))
