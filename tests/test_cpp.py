"""The cpp backend beyond the shared module matrix (test_modules.py runs that for every CPU backend):
its contract against fusedrnn/reference.py called directly, the C++ constants and block rule against
fusedrnn/cells.py and fusedrnn/epilogue.py, bfloat16, thread-count independence, NaN in padding, and what
happens when the extension cannot be loaded or built."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import CELLS, check_oracle, make_pair, random_cotangents, random_hx, random_input, random_layer_call

import fusedrnn
from fusedrnn import backend as backends
from fusedrnn import cells, cpp, epilogue, reference

pytestmark = pytest.mark.skipif(
    cpp.unavailable_reason("cpu", torch.float32, "lstm") is not None, reason="the cpp extension is unavailable"
)


def flat(results):
    """A backend call's results with any LayerWeights of gradients spread out, in order."""
    return [r for item in results for r in (item if isinstance(item, cells.LayerWeights) else [item])]


def assert_same(got, want, tol):
    for i, (a, b) in enumerate(zip(flat(got), flat(want), strict=True)):
        assert (a is None) == (b is None), f"result {i}: one backend returned None"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, i=i: f"result {i}: {m}")


def with_cells(cases):
    """(cell, case) for every cell and case; a case with a projection size (case[4]) for the LSTM only."""
    return [(cell, c) for cell in CELLS for c in cases if c[4] is None or cell == "lstm"]


# (T, B, I, H, P, lengths, reverse, bias). B < 4 takes the input projection as one GEMM first, B >= 4 inside the
# step loop (csrc/cpu/split.h's project_per_step): both schedules meet lengths, reverse, proj and ragged panels here.
CONTRACT_CASES = [
    (5, 3, 4, 6, None, None, False, True),
    (1, 1, 3, 5, None, None, True, True),
    (7, 2, 9, 123, None, [7, 3], True, False),
    (6, 33, 5, 70, None, [6, 1, 4] * 11, False, True),  # B > 8 row tiles, 3 unit panels
    (4, 4, 5, 9, 4, [4, 2, 1, 3], False, True),  # lstm only: projection
    (5, 2, 3, 40, 37, [2, 5], True, True),
]


@pytest.mark.parametrize("cell,case", with_cells(CONTRACT_CASES), ids=str)
def test_contract_matches_reference(cell, case):
    T, B, I, H, P, lengths, reverse, bias = case
    call = random_layer_call(cell, T, B, I, H, P, lengths, reverse, bias)
    got, want = cpp.forward(*call), reference.forward(*call)
    assert_same(got[:3], want[:3], 1e-12)
    assert got[3].shape == cells.saved_shape(cell, T, B, H)
    cot = random_cotangents(call, want[0])
    got_grads, want_grads = cpp.backward(*call, got[0], got[3], *cot), reference.backward(*call, *want[::3], *cot)
    assert isinstance(got_grads[3], cells.LayerWeights)
    assert_same(got_grads, want_grads, 1e-11)


# ---- the C++ constants and the epilogue's block rule, pinned to the Python registry and epilogue -------------
def test_cell_constants_are_the_registrys():
    """csrc/cpu/api.h's gates and saved rows per cell are fusedrnn/cells.py's."""
    table = {name: (cell.gates, cell.saved_rows) for name, cell in cells.CELLS.items()}
    assert cpp._module().cell_constants() == table


@pytest.mark.parametrize("rows", (0, 1, 2047, 2048, 2049, 4096, 5000, 40_000, 123_457))
def test_row_blocks_are_the_epilogues(rows):
    """The C++ epilogue splits a float32 weight gradient's rows into blocks exactly as fusedrnn/epilogue.py does."""
    assert cpp._module().block_rows == epilogue.BLOCK_ROWS
    assert [tuple(block) for block in cpp._module().row_blocks(rows)] == epilogue.row_blocks(rows)


@pytest.mark.parametrize("rows", (300, 2049, 5000, 40_000))
def test_blocked_sum_is_the_epilogues(rows):
    """The same float32 operands give the C++ epilogue's weight-gradient sum and fusedrnn/epilogue.py's to float32
    rounding (the same blocks, the same float64 accumulation; two blocks add once in float32, which rounds the
    same way)."""
    a, b = torch.randn(rows, 12), torch.randn(rows, 7)
    got, want = cpp._module().sum_of_outer(a, b), epilogue.sum_of_outer(a[None], b[None])
    torch.testing.assert_close(got, want, rtol=2 * torch.finfo(torch.float32).eps, atol=0)


def _sys_cache(level):
    """(bytes, CPUs sharing it) of cpu0's data or unified cache `level` as Linux lists it, or None."""
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        if (index / "level").read_text().strip() == str(level) and (index / "type").read_text().strip() != "Instruction":
            size = (index / "size").read_text().strip()
            shared = 0
            for part in (index / "shared_cpu_list").read_text().strip().split(","):
                first, _, last = part.partition("-")
                shared += int(last or first) - int(first) + 1
            return int(size[:-1]) << {"K": 10, "M": 20}[size[-1]], shared
    return None


@pytest.mark.skipif(_sys_cache(2) is None or _sys_cache(3) is None, reason="no cache sizes in /sys")
def test_cache_budgets_come_from_the_machine():
    """The scheduling heuristics (csrc/cpu/split.h) budget against this machine's L2 and its share of L3."""
    (l2, _), (l3, sharing) = _sys_cache(2), _sys_cache(3)
    assert cpp._module().cache_sizes() == (l2, l3 // sharing)


@pytest.mark.parametrize("reverse", (False, True))
@pytest.mark.parametrize("T,B", [(1100, 2), (52, 100), (1, 5000)], ids=("2-blocks", "3-blocks-split", "h0-only"))
def test_float32_weight_grads_in_row_blocks(T, B, reverse):
    """float32 weight gradients are GEMMs over blocks of <= 2048 of the T*B rows (dW_hh's rows in time order, h0's
    with the first step's), summed in float64: every row is counted once, whatever the block boundaries, and the
    result is the epilogue's on the reference's gate gradients (equal inputs: the reference in float64)."""
    call = random_layer_call("lstm", T, B, 3, 4, P=3, reverse=reverse, dtype=torch.float32)
    wide = call._replace(x=call.x.double(), h0=call.h0.double(), c0=call.c0.double(),
                         weights=cells.LayerWeights(*(w.double() for w in call.weights)))
    y, _, _, saved = cpp.forward(*call)
    cot = random_cotangents(call, y)
    got = cpp.backward(*call, y, saved, *cot)[3]
    y64, _, _, saved64 = reference.forward(*wide)
    want = reference.backward(*wide, y64, saved64, *(g.double() for g in cot))[3]
    for name in ("w_ih", "w_hh", "w_hr"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name), rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_outputs_are_fresh_tensors(cell):
    call = random_layer_call(cell, 3, 2, 4, 5)
    y, h_n, c_n, saved = cpp.forward(*call)
    outs = [t for t in (y, h_n, c_n, saved) if t is not None]
    grads = [g for g in flat(cpp.backward(*call, y, saved, *random_cotangents(call, y))) if g is not None]
    inputs = [t for t in flat([call.x, call.h0, call.c0, call.weights]) if t is not None]
    pointers = [t.untyped_storage().data_ptr() for t in outs + grads]
    assert len(set(pointers)) == len(pointers), "two results share storage"
    assert not set(pointers) & {t.untyped_storage().data_ptr() for t in inputs}, "a result aliases an input"


@pytest.mark.parametrize("B", (2, 8), ids=("dx-after-the-loop", "dx-in-the-loop"))
def test_without_need_dx_the_rest_is_unchanged(B):
    """need_dx=False (the input needs no gradient): no dx, every other gradient bit for bit the same."""
    call = random_layer_call("lstm", 6, B, 5, 40, lengths=[6, 3] * (B // 2), reverse=True, dtype=torch.float32)
    y, _, _, saved = cpp.forward(*call)
    cot = random_cotangents(call, y)
    full, lean = cpp.backward(*call, y, saved, *cot), cpp.backward(*call, y, saved, *cot, False)
    assert full[0] is not None and lean[0] is None
    for a, b in zip(flat(full[1:]), flat(lean[1:]), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("cell", ("lstm", "gru"))
@pytest.mark.parametrize("absent", ("b_ih", "b_hh"))
def test_one_bias_absent(cell, absent):
    """The contract lets b_ih and b_hh be None independently: the cell rows add whichever is there, and the
    backward returns a gradient for exactly that one (checked against autograd through the reference)."""
    call = random_layer_call(cell, 4, 5, 3, 6)
    call = call._replace(weights=call.weights._replace(**{absent: None}))
    got, want = cpp.forward(*call), reference.forward(*call)
    assert_same(got[:3], want[:3], 1e-12)
    y, saved = want[0], want[3]
    cot = random_cotangents(call, y)
    grads = reference.backward(*call, y, saved, *cot)
    assert_same(cpp.backward(*call, y, saved, *cot), grads, 1e-12)
    present = "b_hh" if absent == "b_ih" else "b_ih"
    assert getattr(grads[3], absent) is None
    bias = getattr(call.weights, present).detach().requires_grad_()
    out = reference.forward(*call._replace(weights=call.weights._replace(**{present: bias})))
    outs, cots = zip(*[(o, c) for o, c in zip(out[:3], cot) if c is not None])
    (db,) = torch.autograd.grad(outs, [bias], cots)
    torch.testing.assert_close(getattr(grads[3], present), db, rtol=1e-10, atol=1e-12)


def test_saved_activations_come_from_a_pool():
    """saved outlives the call, so it is pooled, not scratch: two live ones never share memory, and a freed one is
    what the next call of its size gets (no fresh, page-faulting memory per training step)."""
    call = random_layer_call("gru", 5, 3, 4, 6)
    first, second = cpp.forward(*call)[3], cpp.forward(*call)[3]
    assert first.data_ptr() != second.data_ptr()
    address = first.data_ptr()
    del first
    assert cpp.forward(*call)[3].data_ptr() == address


def test_outputs_from_the_pool_are_ordinary_tensors():
    """y comes from the pool too (an inference loop frees each call's y before the next call): it still resizes,
    through the pool's allocator and keeping its values, and the block a freed y leaves serves the next call."""
    call = random_layer_call("lstm", 5, 3, 4, 6)
    y = cpp.forward(*call)[0]
    first, address = y.clone(), y.data_ptr()
    y.resize_(2 * y.shape[0], *y.shape[1:])
    assert torch.equal(y[: first.shape[0]], first)
    del y
    again = cpp.forward(*call)[0]
    assert again.data_ptr() == address and torch.equal(again, first)


# (T, B, I, H, P, lengths, reverse). With 2 threads the first two split the batch rows (4-5 rows per worker, and a
# step's float64 panels, ~G*H*(I+P) values, within Split::rows_pay's budget for that), the last one the hidden units
# (H too large).
SPLIT_CASES = [
    (6, 10, 5, 40, None, [6, 2, 5, 1, 6, 3, 4, 6, 2, 5], True),
    (5, 9, 3, 24, 17, [5, 1, 3, 5, 2, 4, 5, 5, 1], False),  # lstm only: projection
    (4, 12, 6, 400, None, None, False),
]


@pytest.mark.parametrize("cell,case", with_cells(SPLIT_CASES), ids=str)
def test_row_and_unit_splits(cell, case):
    """Both ways of splitting a layer between threads match the reference, and give the bits one thread gives
    (the weight gradients come from MKL, whose threading may round differently: compared with a tolerance)."""
    T, B, I, H, P, lengths, reverse = case
    call = random_layer_call(cell, T, B, I, H, P, lengths, reverse)
    cot = random_cotangents(call, torch.empty(T, B, P or H, dtype=torch.float64))
    before, results = torch.get_num_threads(), {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y, h_n, c_n, saved = cpp.forward(*call)
            results[threads] = (y, h_n, c_n, *cpp.backward(*call, y, saved, *cot))
    finally:
        torch.set_num_threads(before)
    want = reference.forward(*call)
    assert_same(results[2][:3], want[:3], 1e-12)
    assert_same(results[2][3:], reference.backward(*call, *want[::3], *cot), 1e-11)
    assert_same(results[2][:6], results[1][:6], 0.0)  # y, h_n, c_n, dx, dh0, dc0: our kernels
    assert_same(results[2][6:], results[1][6:], 1e-12)


def test_thread_count_does_not_change_results():
    call = random_layer_call("lstm", 6, 9, 5, 100, lengths=[6, 2, 5, 1, 6, 3, 4, 6, 2], reverse=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.forward(*call)
        torch.set_num_threads(2)
        two = cpp.forward(*call)
    finally:
        torch.set_num_threads(before)
    assert_same(one, two, 0.0)


@pytest.mark.parametrize("cell", CELLS)
def test_nan_in_padding_does_not_leak(cell):
    call = random_layer_call(cell, 5, 3, 4, 7, lengths=[5, 2, 3])
    call.x[2:, 1] = float("nan")
    call.x[3:, 2] = float("nan")
    y, h_n, c_n, saved = cpp.forward(*call)
    assert torch.isfinite(h_n).all() and (c_n is None or torch.isfinite(c_n).all())
    want = reference.forward(*call)
    torch.testing.assert_close(h_n, want[1], rtol=1e-12, atol=1e-12)
    dx, dh0, dc0, dweights = cpp.backward(*call, y, saved, *random_cotangents(call, y))
    # dW_ih = dG^T x multiplies padding by its zero gradient, NaN included, as the reference does
    assert torch.isfinite(dx[:2]).all() and torch.isfinite(dx[:, 0]).all()
    finite = (dh0, dc0, dweights.w_hh, dweights.b_ih, dweights.b_hh)
    assert all(torch.isfinite(g).all() for g in finite if g is not None)


def test_float32_activations_accurate_and_saturating():
    """The vectorised sigmoid and tanh (csrc/cpu/activation.h), read from a one-step LSTM's saved activations whose
    gate pre-activations are exactly w_ih (x = 1, h0 = 0): a few ulp of relative error at every magnitude,
    tiny ones included (1 - 2 / (1 + e^2x) cancels there), and exactly 0 / +-1 once saturated, like torch
    (a saturated gate's derivative must be exactly 0 for BPTT to cancel huge states)."""
    tiny_to_large = torch.logspace(-30, 1.9, 400, dtype=torch.float64)
    accurate = torch.cat((-tiny_to_large, torch.zeros(1, dtype=torch.float64), tiny_to_large)).float()
    saturated = torch.tensor([-1e30, -1e4, -200.0, -100.0, 100.0, 200.0, 1e4, 1e30])
    pre = torch.cat((accurate, saturated))
    H, n = pre.numel(), accurate.numel()
    weights = cells.LayerWeights(pre.repeat(4).unsqueeze(1), torch.zeros(4 * H, H))
    call = random_layer_call("lstm", 1, 1, 1, H, bias=False, dtype=torch.float32)
    call = call._replace(x=torch.ones(1, 1, 1), h0=torch.zeros(1, H), c0=torch.zeros(1, H), weights=weights)
    saved = cpp.forward(*call)[3][0, 0]
    for name, got, exact in (("sigmoid", saved[:H], torch.sigmoid), ("tanh", saved[2 * H : 3 * H], torch.tanh)):
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

