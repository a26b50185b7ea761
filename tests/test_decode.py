"""Small calls on the CPU: generation one step at a time and short sequences.

- The cpp backend's direct driver (a few steps: products on the weights as stored, no packed panels) against
  torch.nn under the oracle, with every option that reaches its cell rows (biases, proj_size, reverse, lengths):
  test_modules.py::test_matches_torch's SHORT_CASES.
- A decode loop carrying the state, as text generation runs it.
- Every way of changing a parameter between two calls gives the output torch.nn gives after the same change: the
  cpp backend keeps no weights between calls (nothing can go stale), and these tests hold any future cache to that.
- The op layer's direct call under no_grad: the same numbers as the custom op, and still the op wherever a mode
  intercepts ops.
- A module's whole forward in one backend call under no_grad (reference.py's inference contract): bit for bit the
  layer-by-layer op path, for every option, in both of the cpp backend's direct-driver schedules (the calling thread,
  and the team split by units for large steps).
"""

import pytest
import torch
from conftest import CELLS, Case, case_id, case_inputs, make_pair, random_hx, random_input, rel_err
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedrnn
from fusedrnn import backend as backends
from fusedrnn import ops

_REASON = backends._reason("cpp", "cpu", torch.float32, "lstm")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpp backend: {_REASON}")


def _decode(model, xs, hx):
    """One call per step of xs: (T, B, I), carrying the state; the outputs (T, B, P) and the last state."""
    ys = []
    with torch.no_grad():
        for x in xs:
            y, hx = model(x.unsqueeze(0), hx)
            ys.append(y)
    return torch.cat(ys), hx


@pytest.mark.parametrize("cell", CELLS)
def test_decode_loop_matches_torch(cell):
    fused, ref = make_pair(cell, 6, 32, "cpp", num_layers=2)
    xs, hx = random_input(30, 4, 6), random_hx(cell, 2, 4, 32)
    gold = _decode(ref.double(), xs, hx)
    as_float = (lambda h: tuple(t.float() for t in h)) if cell == "lstm" else (lambda h: h.float())
    got = _decode(fused.float(), xs.float(), as_float(hx))
    base = _decode(ref.float(), xs.float(), as_float(hx))
    assert fused.last_backend == "cpp"
    flat = [torch.cat([t[0].flatten(), *(s.flatten() for s in (t[1] if cell == "lstm" else (t[1],)))])
            for t in (got, base, gold)]
    assert rel_err(flat[0], flat[2]) <= 2 * rel_err(flat[1], flat[2]) + 2e-6


# ---- changing parameters between calls ------------------------------------------------------------------
def _new_values(t):
    return torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(7)) * 0.3


def _in_place(m):
    with torch.no_grad():
        m.weight_hh_l0.mul_(-0.5)  # bumps the version counter


def _data_copy(m):
    m.weight_hh_l0.data.copy_(_new_values(m.weight_hh_l0))  # .data: the version counter does NOT move


def _data_index(m):
    with torch.no_grad():
        m.weight_ih_l0.data[1:3] = 0.25  # .data again, a part of the tensor


def _swap(m):
    m.weight_hh_l0 = nn.Parameter(_new_values(m.weight_hh_l0))


def _load_state_dict(m):
    m.load_state_dict({k: _new_values(v) for k, v in m.state_dict().items()})


def _optimizer_step(m):
    m.zero_grad()
    x = torch.ones(3, 2, m.input_size, dtype=m.weight_ih_l0.dtype)
    m(x)[0].sum().backward()
    torch.optim.SGD(m.parameters(), lr=0.5).step()


def _to_float32(m):
    m.to(torch.float32)


CHANGES = [_in_place, _data_copy, _data_index, _swap, _load_state_dict, _optimizer_step, _to_float32]


@pytest.mark.parametrize("T", [1, 12], ids=["direct", "packed"])
@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("cell", CELLS)
def test_every_parameter_change_is_seen(cell, change, T):
    """A call before the change (it would fill any cache), the change on both models, a call after: the same
    output as torch.nn's, and a different one from before."""
    fused, ref = make_pair(cell, 5, 40, "cpp", dtype=torch.float64, num_layers=2)
    x, hx = random_input(T, 4, 5), random_hx(cell, 2, 4, 40)  # a state: with h0 = 0, W_hh has no effect at T=1
    with torch.no_grad():
        before = fused(x, hx)[0]
    change(fused)
    change(ref)
    dtype = fused.weight_hh_l0.dtype
    x, hx = x.to(dtype), tuple(h.to(dtype) for h in hx) if cell == "lstm" else hx.to(dtype)
    with torch.no_grad():
        after, expected = fused(x, hx)[0], ref(x, hx)[0]
    assert fused.last_backend == "cpp"
    if change is _to_float32:  # new tensors in another dtype, the same values up to rounding
        torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)
        assert after.dtype == torch.float32
    else:
        torch.testing.assert_close(after, expected)
        assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("T", [1, 12], ids=["direct", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_tied_weights_across_two_modules(cell, T):
    """Two modules holding one Parameter: a change through either shows in both, as with torch.nn."""
    first, first_ref = make_pair(cell, 5, 24, "cpp", dtype=torch.float64)
    second, second_ref = make_pair(cell, 5, 24, "cpp", dtype=torch.float64)
    second.weight_hh_l0, second_ref.weight_hh_l0 = first.weight_hh_l0, first_ref.weight_hh_l0
    x, hx = random_input(T, 3, 5), random_hx(cell, 1, 3, 24)
    with torch.no_grad():
        before = first(x, hx)[0]
        second(x, hx)
        for model in (second, second_ref):
            model.weight_hh_l0.data.mul_(-2.0)  # through the other module, without a version bump
        for fused, ref in ((first, first_ref), (second, second_ref)):
            torch.testing.assert_close(fused(x, hx)[0], ref(x, hx)[0])
        assert (first(x, hx)[0] - before).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["bias_hh_l0", "weight_ih_l1"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("cell", CELLS)
def test_a_parameter_set_to_none_raises_like_torch(cell, grad, name):
    """A parameter swapped for None: torch.nn raises TypeError (its kernels take no None weight), so do we; a zero
    bias in its place would be silently wrong."""
    fused, ref = make_pair(cell, 5, 8, "cpp", num_layers=2)
    x = random_input(3, 2, 5).float()
    for model in (fused, ref):
        setattr(model, name, None)
        with torch.set_grad_enabled(grad), pytest.raises(TypeError, match="expected Tensor as element"):
            model(x)


# ---- the op layer's direct call ------------------------------------------------------------------------
class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("T", [1, 12])
def test_no_grad_call_equals_the_op_and_modes_still_see_the_op(T):
    fused = fusedrnn.LSTM(5, 16, 2, backend="cpp")
    x = random_input(T, 4, 5).float()
    with torch.no_grad():
        direct = fused(x)
        with _Ops() as mode:
            recorded = fused(x)
    through_op = fused(x)  # grad mode on, parameters require grad: the custom op and autograd
    assert torch.ops.fusedrnn.layer_forward.default in mode.seen
    for a, b, c in zip((direct[0], *direct[1]), (recorded[0], *recorded[1]), (through_op[0], *through_op[1])):
        assert torch.equal(a, b) and torch.equal(a, c.detach())


def test_eager_training_applies_the_op_functions_without_its_wrapper(monkeypatch):
    """With a gradient to follow in plain eager mode, run_layer applies the op's own implementation, context and
    backward through an autograd.Function (torch.library's autograd wrapper costs ~37 us a call); under a mode it
    calls the op. The same outputs and gradients, bit for bit."""
    fused = fusedrnn.LSTM(5, 16, 2, backend="cpp")
    x = random_input(6, 3, 5).float().requires_grad_()
    applied = []
    original = ops._LayerForwardEager.apply
    monkeypatch.setattr(ops._LayerForwardEager, "apply", lambda *args: applied.append(1) or original(*args))

    def outputs_and_gradients():
        y, (h, c) = fused(x)
        return [y, h, c, *torch.autograd.grad(y.sum() + h.sum() + c.sum(), [x, *fused.parameters()])]

    eager = outputs_and_gradients()
    assert len(applied) == 2  # one per layer
    with _Ops() as mode:
        through_op = outputs_and_gradients()
    assert len(applied) == 2 and torch.ops.fusedrnn.layer_forward.default in mode.seen
    for a, b in zip(eager, through_op):
        assert torch.equal(a, b)


def test_backend_choice_follows_the_environment_between_calls(monkeypatch):
    """The kept choice is per request: FUSEDRNN_BACKEND changed between calls of an "auto" module takes effect."""
    model, x = fusedrnn.GRU(3, 8), torch.randn(2, 1, 3)
    for request, expected in (("reference", "reference"), ("cpp", "cpp"), ("reference", "reference")):
        monkeypatch.setenv(backends.ENV_VAR, request)
        with torch.no_grad():
            model(x)
        assert model.last_backend == expected


@pytest.mark.parametrize("cell", CELLS)
def test_per_call_path_has_no_host_sync_or_device_copy(cell):
    """What modules.py and ops.py run around the kernels, seen as ATen ops: no .item() (_local_scalar_dense, a
    host-device synchronisation on CUDA) and no copy between devices, so a step can be captured in a CUDA graph
    (what the backend kernel itself does is the backend's: fusedrnn/cuda.py)."""
    model, _ = make_pair(cell, 5, 8, "cpp", num_layers=2)
    x = torch.randn(1, 3, 5)
    with torch.no_grad(), _Ops() as mode:
        _, hx = model(x)
        model(x, hx)
    names = {str(f) for f in mode.seen}
    assert {"aten.zeros.default", "fusedrnn.layer_forward.default"} <= names  # modules.py's ops are seen too
    assert not {n for n in names if "_local_scalar_dense" in n or "item" in n}
    copies = [f for f in mode.seen if f in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)]
    assert not copies


# ---- the whole forward in one call ---------------------------------------------------------------------------
INFERENCE_CASES = [
    *(Case(cell, 7, 19, T, B, {"num_layers": 2, "bias": bias, "bidirectional": d})
      for cell in CELLS for T, B, bias, d in [(1, 1, True, False), (2, 3, False, True), (12, 2, True, True)]),
    # H = 256 at B = 4: each step's products are large enough for the direct driver's team split (forward.h)
    *(Case(cell, 96, 256, T, 4, {"bidirectional": True}) for cell in CELLS for T in (1, 2)),
    Case("lstm", 96, 256, 2, 4, {"num_layers": 2, "proj_size": 64, "bidirectional": True}),
    Case("lstm", 5, 9, 3, 2, {"num_layers": 3, "proj_size": 4, "batch_first": True}),
    *(Case(cell, 6, 16, 3, 4, {"num_layers": 2, "bidirectional": True}, "packed", (3, 1, 2, 3)) for cell in CELLS),
    Case("lstm", 96, 256, 2, 4, {"bidirectional": True}, "packed", (2, 1, 2, 1)),
    Case("gru", 4, 8, 5, 1, {"num_layers": 2}, "unbatched", with_hx=False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("case", INFERENCE_CASES, ids=case_id)
def test_no_grad_forward_in_one_call_equals_the_op_path(case, backend, dtype, monkeypatch):
    fused, _ = make_pair(case.cell, case.input_size, case.hidden, backend, dtype=dtype, **case.kwargs)
    x, hx = case_inputs(case)
    x = x.to(dtype) if isinstance(x, torch.Tensor) else nn.utils.rnn.PackedSequence(x.data.to(dtype), *x[1:])
    hx = None if hx is None else tuple(h.to(dtype) for h in hx) if case.cell == "lstm" else hx.to(dtype)
    module, calls = backends.get(backend), []
    original = module.inference
    monkeypatch.setattr(module, "inference", lambda *args: calls.append(1) or original(*args))
    with torch.no_grad():
        one_call = fused(x, hx)
    assert calls == [1]
    by_layers = fused(x, hx)  # the parameters require grad: the op per layer-direction, under autograd
    assert calls == [1] and fused.last_backend == backend
    for got, expected in zip(_tensors(one_call), _tensors(by_layers)):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected.detach())


def _tensors(output):
    y, hidden = output
    y = y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y
    return [y, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def test_dropout_in_training_mode_keeps_the_layer_path_under_no_grad(monkeypatch):
    """train() with dropout draws masks between layers even under no_grad (torch.nn does): not the one-call path."""
    fused = fusedrnn.GRU(4, 8, num_layers=2, dropout=0.5, backend="cpp")
    monkeypatch.setattr(fusedrnn.cpp, "inference", lambda *args: pytest.fail("one call with dropout"))
    with torch.no_grad():
        fused(torch.randn(3, 2, 4))
