"""The cpp backend beyond the shared module matrix (test_modules.py runs that for every CPU backend):
its contract against fusedrnn/reference.py called directly, bfloat16, thread-count independence, NaN in
padding, and what happens when the extension cannot be loaded or built."""

import sys
import warnings

import pytest
import torch
from conftest import check_oracle, make_pair, random_hx, random_input

import fusedrnn
from fusedrnn import backend as backends
from fusedrnn import cpp, reference

pytestmark = pytest.mark.skipif(
    cpp.unavailable_reason("cpu", torch.float32, "lstm") is not None, reason="the cpp extension is unavailable"
)

MODES = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def layer_args(mode, T, B, I, H, P=None, lengths=None, reverse=False, bias=True, dtype=torch.float64):
    """Random arguments of one forward call in contract order: (mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
    w_hr, lengths, reverse). P != H gives an LSTM projection; lengths is a list or None."""
    G, P = reference.GATES[mode], P or H

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, dtype=dtype) * scale

    return (
        mode,
        rand(T, B, I),
        rand(B, P),
        rand(B, H) if mode == "lstm" else None,
        rand(G * H, I, scale=0.4),
        rand(G * H, P, scale=0.4),
        rand(G * H) if bias else None,
        rand(G * H) if bias else None,
        rand(P, H, scale=0.4) if P != H else None,
        None if lengths is None else torch.tensor(lengths, dtype=torch.int64),
        reverse,
    )


def grad_args(args, y):
    """Random (dy, dh_n, dc_n) for a forward call's outputs."""
    dc_n = torch.randn_like(args[3]) if args[0] == "lstm" else None
    return torch.randn_like(y), torch.randn_like(args[2]), dc_n


def assert_same(got, want, tol):
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"result {i}: one backend returned None"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, i=i: f"result {i}: {m}")


def with_cells(cases):
    """(mode, case) for every cell and case; a case with a projection size (case[4]) for the LSTM only."""
    return [(m, c) for m in MODES for c in cases if c[4] is None or m == "lstm"]


# (T, B, I, H, P, lengths, reverse, bias). B < 4 takes the input projection as one GEMM first, B >= 4 inside the
# step loop (recurrence.h's project_per_step): both schedules meet lengths, reverse, proj and ragged panels here.
CONTRACT_CASES = [
    (5, 3, 4, 6, None, None, False, True),
    (1, 1, 3, 5, None, None, True, True),
    (7, 2, 9, 123, None, [7, 3], True, False),
    (6, 33, 5, 70, None, [6, 1, 4] * 11, False, True),  # B > 8 row tiles, 3 unit panels
    (4, 4, 5, 9, 4, [4, 2, 1, 3], False, True),  # lstm only: projection
    (5, 2, 3, 40, 37, [2, 5], True, True),
]


@pytest.mark.parametrize("mode,case", with_cells(CONTRACT_CASES), ids=str)
def test_contract_matches_reference(mode, case):
    T, B, I, H, P, lengths, reverse, bias = case
    args = layer_args(mode, T, B, I, H, P, lengths, reverse, bias)
    got, want = cpp.forward(*args), reference.forward(*args)
    assert_same(got[:3], want[:3], 1e-12)
    assert got[3].shape == cpp.workspace_shape(mode, T, B, H, P or H)
    grads = grad_args(args, want[0])
    assert_same(cpp.backward(*args, got[0], got[3], *grads), reference.backward(*args, want[0], want[3], *grads), 1e-11)


@pytest.mark.parametrize("T,B", [(1100, 2), (52, 100), (1, 5000)], ids=("2-blocks", "3-blocks-split", "h0-only"))
def test_float32_weight_grads_in_row_blocks(T, B):
    """float32 weight gradients are GEMMs over blocks of <= 2048 of the T*B rows (dW_hh's first block starts
    with the h0 rows), summed in float64: every row is counted once, whatever the block boundaries."""
    args = layer_args("lstm", T, B, 3, 4, P=3, dtype=torch.float32)
    wide = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    y, _, _, ws = cpp.forward(*args)
    grads = grad_args(args, y)
    got = cpp.backward(*args, y, ws, *grads)
    y64, _, _, ws64 = reference.forward(*wide)
    want = reference.backward(*wide, y64, ws64, *(g.double() if g is not None else None for g in grads))
    for name, i in (("dw_ih", 3), ("dw_hh", 4), ("dw_hr", 7)):
        torch.testing.assert_close(got[i].double(), want[i], rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", ("lstm", "gru"))
def test_outputs_are_fresh_tensors(mode):
    args = layer_args(mode, 3, 2, 4, 5)
    y, h_n, c_n, ws = cpp.forward(*args)
    outs = [t for t in (y, h_n, c_n, ws) if t is not None]
    grads = [g for g in cpp.backward(*args, y, ws, *grad_args(args, y)) if g is not None]
    inputs = [t for t in args if isinstance(t, torch.Tensor)]
    pointers = [t.untyped_storage().data_ptr() for t in outs + grads]
    assert len(set(pointers)) == len(pointers), "two results share storage"
    assert not set(pointers) & {t.untyped_storage().data_ptr() for t in inputs}, "a result aliases an input"


@pytest.mark.parametrize("B", (2, 8), ids=("dx-after-the-loop", "dx-in-the-loop"))
def test_without_need_dx_the_rest_is_unchanged(B):
    """need_dx=False (the input needs no gradient): no dx, every other gradient bit for bit the same."""
    args = layer_args("lstm", 6, B, 5, 40, lengths=[6, 3] * (B // 2), reverse=True, dtype=torch.float32)
    y, _, _, ws = cpp.forward(*args)
    grads = grad_args(args, y)
    full, lean = cpp.backward(*args, y, ws, *grads), cpp.backward(*args, y, ws, *grads, False)
    assert full[0] is not None and lean[0] is None
    for a, b in zip(full[1:], lean[1:], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("mode", ("lstm", "gru"))
@pytest.mark.parametrize("absent", (6, 7), ids=("no-b_ih", "no-b_hh"))
def test_one_bias_absent(mode, absent):
    """The contract lets b_ih and b_hh be None independently: the cell rows add whichever is there, and the
    backward returns a gradient for exactly that one (checked against autograd through the reference)."""
    args = list(layer_args(mode, 4, 5, 3, 6))
    args[absent] = None
    got, want = cpp.forward(*args), reference.forward(*args)
    assert_same(got[:3], want[:3], 1e-12)
    y, ws = want[0], want[3]
    cot = grad_args(args, y)
    grads = reference.backward(*args, y, ws, *cot)
    assert_same(cpp.backward(*args, y, ws, *cot), grads, 1e-12)
    present = 13 - absent  # the other bias
    assert grads[absent - 1] is None
    bias = args[present].detach().requires_grad_()
    args[present] = bias
    out = reference.forward(*args)
    outs, cots = zip(*[(o, c) for o, c in zip(out[:3], cot) if c is not None])
    (db,) = torch.autograd.grad(outs, [bias], cots)
    torch.testing.assert_close(grads[present - 1], db, rtol=1e-10, atol=1e-12)


def test_saved_activations_come_from_a_pool():
    """ws outlives the call, so it is pooled, not scratch: two live ones never share memory, and a freed one is
    what the next call of its size gets (no fresh, page-faulting memory per training step)."""
    args = layer_args("gru", 5, 3, 4, 6)
    first, second = cpp.forward(*args)[3], cpp.forward(*args)[3]
    assert first.data_ptr() != second.data_ptr()
    address = first.data_ptr()
    del first
    assert cpp.forward(*args)[3].data_ptr() == address


# (T, B, I, H, P, lengths, reverse). With 2 threads the first two split the batch rows (4-5 rows per worker, and a
# step's float64 panels, ~G*H*(I+P) values, within Split::rows_pay's budget for that), the last one the hidden units
# (H too large).
SPLIT_CASES = [
    (6, 10, 5, 40, None, [6, 2, 5, 1, 6, 3, 4, 6, 2, 5], True),
    (5, 9, 3, 24, 17, [5, 1, 3, 5, 2, 4, 5, 5, 1], False),  # lstm only: projection
    (4, 12, 6, 400, None, None, False),
]


@pytest.mark.parametrize("mode,case", with_cells(SPLIT_CASES), ids=str)
def test_row_and_unit_splits(mode, case):
    """Both ways of splitting a layer between threads match the reference, and give the bits one thread gives
    (the weight gradients come from MKL, whose threading may round differently: compared with a tolerance)."""
    T, B, I, H, P, lengths, reverse = case
    args = layer_args(mode, T, B, I, H, P, lengths, reverse)
    grads = grad_args(args, torch.empty(T, B, P or H, dtype=torch.float64))
    before, results = torch.get_num_threads(), {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y, h_n, c_n, ws = cpp.forward(*args)
            results[threads] = (y, h_n, c_n, *cpp.backward(*args, y, ws, *grads))
    finally:
        torch.set_num_threads(before)
    want = reference.forward(*args)
    assert_same(results[2][:3], want[:3], 1e-12)
    assert_same(results[2][3:], reference.backward(*args, want[0], want[3], *grads), 1e-11)
    assert_same(results[2][:6], results[1][:6], 0.0)  # y, h_n, c_n, dx, dh0, dc0: our kernels
    assert_same(results[2][6:], results[1][6:], 1e-12)


def test_thread_count_does_not_change_results():
    args = layer_args("lstm", 6, 9, 5, 100, lengths=[6, 2, 5, 1, 6, 3, 4, 6, 2], reverse=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.forward(*args)
        torch.set_num_threads(2)
        two = cpp.forward(*args)
    finally:
        torch.set_num_threads(before)
    assert_same(one, two, 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_nan_in_padding_does_not_leak(mode):
    args = list(layer_args(mode, 5, 3, 4, 7, lengths=[5, 2, 3]))
    x = args[1]
    x[2:, 1] = float("nan")
    x[3:, 2] = float("nan")
    y, h_n, c_n, ws = cpp.forward(*args)
    assert torch.isfinite(h_n).all() and (c_n is None or torch.isfinite(c_n).all())
    want = reference.forward(*args)
    torch.testing.assert_close(h_n, want[1], rtol=1e-12, atol=1e-12)
    dy, dh_n, dc_n = grad_args(args, y)
    dx, dh0, dc0, _, dw_hh, db_ih, db_hh, _ = cpp.backward(*args, y, ws, dy, dh_n, dc_n)
    # dW_ih = dG^T x multiplies padding by its zero gradient, NaN included, as the reference does
    assert torch.isfinite(dx[:2]).all() and torch.isfinite(dx[:, 0]).all()
    assert all(torch.isfinite(g).all() for g in (dh0, dc0, dw_hh, db_ih, db_hh) if g is not None)


def test_float32_activations_accurate_and_saturating():
    """The vectorised sigmoid and tanh (csrc/cpu/activation.h), read from a one-step LSTM's workspace whose
    gate pre-activations are exactly w_ih (x = 1, h0 = 0): a few ulp of relative error at every magnitude,
    tiny ones included (1 - 2 / (1 + e^2x) cancels there), and exactly 0 / +-1 once saturated, like torch
    (a saturated gate's derivative must be exactly 0 for BPTT to cancel huge states)."""
    tiny_to_large = torch.logspace(-30, 1.9, 400, dtype=torch.float64)
    accurate = torch.cat((-tiny_to_large, torch.zeros(1, dtype=torch.float64), tiny_to_large)).float()
    saturated = torch.tensor([-1e30, -1e4, -200.0, -100.0, 100.0, 200.0, 1e4, 1e30])
    pre = torch.cat((accurate, saturated))
    H, n = pre.numel(), accurate.numel()
    args = list(layer_args("lstm", 1, 1, 1, H, bias=False, dtype=torch.float32))
    args[1], args[2], args[3] = torch.ones(1, 1, 1), torch.zeros(1, H), torch.zeros(1, H)
    args[4], args[5] = pre.repeat(4).unsqueeze(1), torch.zeros(4 * H, H)
    ws = cpp.forward(*args)[3][0, 0]
    for name, got, exact in (("sigmoid", ws[:H], torch.sigmoid), ("tanh", ws[2 * H : 3 * H], torch.tanh)):
        truth = exact(pre.double())
        err = ((got[:n].double() - truth[:n]).abs() / truth[:n].abs().clamp_min(1e-300)).max().item()
        assert err <= 4 * torch.finfo(torch.float32).eps, f"{name}: relative error {err:.2e}"
        assert torch.equal(got[n:], exact(saturated)), f"{name} does not saturate exactly like torch"


@pytest.mark.parametrize("cell", ("lstm", "gru", "rnn_tanh"))
def test_bfloat16_oracle(cell):
    """bfloat16 runs in float32 inside; held to the oracle against torch.nn in bfloat16."""
    fused, ref = make_pair(cell, 6, 20, "cpp", num_layers=2)
    check_oracle(fused, ref, random_input(7, 3, 6), random_hx(cell, 2, 3, 20), dtype=torch.bfloat16)
    assert fused.last_backend == "cpp"


def test_unavailable_reasons_name_the_cause():
    assert "CPU only" in cpp.unavailable_reason("cuda", torch.float32, "lstm")
    assert "float16" in cpp.unavailable_reason("cpu", torch.float16, "gru")
    assert cpp.unavailable_reason("cpu", torch.bfloat16, "rnn_relu") is None


def hide_aot_extension(monkeypatch):
    """Make `from . import _cpp` raise ImportError, as without the AOT build, and forget the cached verdict."""
    cpp._extension.cache_clear()
    monkeypatch.setitem(sys.modules, "fusedrnn._cpp", None)
    monkeypatch.delattr(fusedrnn, "_cpp", raising=False)


@pytest.fixture
def broken_build(monkeypatch):
    """The AOT extension missing and the first-use build failing; the cached verdict is reset around it."""

    def fail():
        raise RuntimeError("Error building extension 'fusedrnn_cpp': c++: not found")

    hide_aot_extension(monkeypatch)
    monkeypatch.setattr(cpp, "_build", fail)
    yield
    cpp._extension.cache_clear()


def test_build_failure_is_a_clear_reason(broken_build):
    reason = cpp.unavailable_reason("cpu", torch.float32, "lstm")
    assert "fusedrnn._cpp" in reason and "c++: not found" in reason and "pip install" in reason
    assert "cpp" not in fusedrnn.available_backends("cpu")
    with pytest.raises(RuntimeError, match="c\\+\\+: not found"):
        fusedrnn.GRU(3, 4, backend="cpp")(torch.randn(2, 1, 3))


def test_build_failure_auto_warns_once_and_uses_reference(broken_build):
    model = fusedrnn.LSTM(3, 4, backend="auto")
    with pytest.warns(RuntimeWarning, match="c\\+\\+: not found"):
        model(torch.randn(2, 1, 3))
    assert model.last_backend == "reference"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(torch.randn(2, 1, 3))
    assert not [w for w in record if "c++: not found" in str(w.message)], "warned twice"
    assert backends.resolve("auto", "cpu", torch.float32, "lstm") == "reference"


@pytest.mark.slow
def test_first_use_build(monkeypatch):
    """Without the AOT extension, the sources are compiled (or taken from torch's cache) and work."""
    hide_aot_extension(monkeypatch)
    try:
        module, reason = cpp._extension()
        assert reason is None and module.__name__ == cpp.JIT_NAME
        args = layer_args("gru", 3, 2, 4, 5)
        assert_same(cpp.forward(*args)[:2], reference.forward(*args)[:2], 1e-12)
    finally:
        cpp._extension.cache_clear()
