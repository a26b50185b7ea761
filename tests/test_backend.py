"""Backend selection: argument > FUSEDRNN_BACKEND > auto; named backends run or raise; auto warns once."""

import importlib.util
import warnings

import pytest
import torch

import fusedrnn
from fusedrnn import backend as backends


def test_reference_always_available():
    assert "reference" in fusedrnn.available_backends("cpu")
    assert "reference" in fusedrnn.available_backends()


@pytest.mark.parametrize("environment,argument", [("cuda", "reference"), ("reference", "auto")],
                         ids=["argument_beats_environment", "environment_beats_auto"])
def test_precedence(monkeypatch, environment, argument):
    monkeypatch.setenv(backends.ENV_VAR, environment)
    model = fusedrnn.GRU(3, 4, backend=argument)
    model(torch.randn(2, 1, 3))
    assert model.last_backend == "reference"


def test_bad_environment_value(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="backend must be"):
        fusedrnn.GRU(3, 4)(torch.randn(2, 1, 3))


def test_named_backend_that_cannot_run_raises_with_reason():
    model = fusedrnn.LSTM(3, 4, backend="cuda")  # no CUDA tensors here
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        model(torch.randn(2, 1, 3))


def test_auto_picks_first_available_and_warns_once(monkeypatch):
    fake_reasons = {"cpp": "pretend the extension failed to build", "reference": None}
    monkeypatch.setattr(backends, "_reason", lambda name, *a: fake_reasons[name])
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert backends.resolve("auto", "cpu", torch.float32, "lstm") == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "pretend the extension failed" in messages[0]


def test_auto_on_cpu_uses_the_fastest_available():
    model = fusedrnn.RNN(3, 4)
    model(torch.randn(2, 1, 3))
    expected = "cpp" if "cpp" in fusedrnn.available_backends("cpu") else "reference"
    assert model.last_backend == expected


def test_stack_backends_are_the_modules_with_the_stack_contract():
    for name in backends.NAMES:
        if name == "triton" and importlib.util.find_spec("triton") is None:
            continue
        module = backends.get(name)
        has = hasattr(module, "stack_forward") and hasattr(module, "stack_backward")
        assert backends.runs_stacks(name) == has, name


def test_inference_backends_are_the_modules_with_the_inference_contract():
    for name in backends.NAMES:
        if name == "triton" and importlib.util.find_spec("triton") is None:
            continue
        assert backends.runs_inference(name) == hasattr(backends.get(name), "inference"), name
