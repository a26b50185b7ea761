"""The Triton backend on CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1 without
CUDA), at tiny shapes, in both variants (persistent, split): tiling edge cases, float16, the backend contract
called directly, NaN confinement and the kernels' own arithmetic (tanh, tf32 rounding). Checked against torch.nn
(and the reference backend) with the oracle in conftest.py; the model matrix (1-2 layers, both directions,
proj_size, packed lengths) is test_modules.py::test_matches_torch's triton rows. On a CUDA machine the interpreter
is off and these skip; tests/test_triton_gpu.py runs there.
"""

import math
import sys

import pytest
import torch
from conftest import (
    CELLS,
    FACTOR,
    FLOOR,
    cast_call,
    check_oracle,
    make_pair,
    random_cotangents,
    random_hx,
    random_input,
    random_layer_call,
    rel_err,
)

from fusedrnn import reference
from fusedrnn import triton as triton_backend
from fusedrnn.cells import LayerWeights

_REASON = triton_backend.unavailable_reason("cpu", torch.float32, "lstm")
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=f"triton backend on CPU: {_REASON}"),
    pytest.mark.usefixtures("triton_variant"),  # every test in both variants
]


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles smaller than the tiny test sizes, so that hidden units, reductions and the batch each span
    several tiles (or programs) with a ragged last one. BLOCK_B < 16 is an interpreter-only setting."""
    from fusedrnn.triton import common

    monkeypatch.setattr(common, "BLOCK_B", 2)
    monkeypatch.setattr(common, "MAX_BLOCK_N", 16)
    monkeypatch.setattr(common, "MAX_BLOCK_K", 16)


@pytest.mark.parametrize("cell", CELLS)
def test_tiled(cell, small_tiles):
    """H=20 over 16-wide tiles, B=3 over two programs of 2 rows, reverse direction included."""
    fused, ref = make_pair(cell, 5, 20, "triton", bidirectional=True)
    check_oracle(fused, ref, random_input(3, 3, 5), random_hx(cell, 2, 3, 20))


def test_lstm_proj_tiled(small_tiles):
    fused, ref = make_pair("lstm", 4, 20, "triton", proj_size=18)
    check_oracle(fused, ref, random_input(3, 3, 4), random_hx("lstm", 1, 3, 20, proj_size=18))


@pytest.mark.parametrize("cell", CELLS)
def test_float16_vs_reference(cell):
    """float16 (bfloat16 does not exist in the interpreter): the reference backend in float16 is the
    baseline the oracle compares against, since torch.nn has no float16 RNN on the CPU."""
    fused, _ = make_pair(cell, 5, 12, "triton", bidirectional=True)
    ref = make_pair(cell, 5, 12, "reference", bidirectional=True)[0]
    ref.load_state_dict(fused.state_dict())
    check_oracle(fused, ref, random_input(3, 3, 5), random_hx(cell, 2, 3, 12), dtype=torch.float16)


def _run_layer(backend, call, cot, dtype):
    """Forward then backward of one layer-direction: a float64 LayerCall and cotangents, run in ``dtype``."""
    call, cot = cast_call(call, dtype), cast_call(cot, dtype)
    y, h_n, c_n, saved = backend.forward(*call)
    dx, dh0, dc0, dweights = backend.backward(*call, y, saved, *cot)
    return [y, h_n, c_n, saved], [dx, dh0, dc0, *dweights]


@pytest.mark.parametrize("cell,P", [(cell, None) for cell in CELLS] + [("lstm", 5)], ids=[*CELLS, "lstm_proj"])
@pytest.mark.parametrize("reverse", [False, True])
def test_backend_contract(cell, P, reverse):
    """One layer-direction through the backend functions themselves, with lengths and nonzero dh_n, dc_n:
    every output (saved included: every backend saves the reference's layout) and every gradient meets the
    oracle against the reference backend in float64, with the reference in float32 as the baseline."""
    T, B = 4, 3
    call = random_layer_call(cell, T, B, 6, 9, P, lengths=[T, 1, T - 1], reverse=reverse)
    cot = random_cotangents(call, call.x.new_empty(T, B, call.h0.shape[1]))
    truth = _run_layer(reference, call, cot, torch.float64)
    base = _run_layer(reference, call, cot, torch.float32)
    got = _run_layer(triton_backend, call, cot, torch.float32)
    for kind, factor in ((0, FACTOR["output"]), (1, FACTOR["grad"])):
        for i, (a, b, t) in enumerate(zip(got[kind], base[kind], truth[kind], strict=True)):
            if t is None or t.numel() == 0:
                assert a is None or a.shape == t.shape
                continue
            assert a.shape == t.shape and a.dtype == torch.float32
            assert rel_err(a, t) <= factor * rel_err(b, t) + FLOOR[torch.float32], f"{kind}[{i}]"


@pytest.mark.parametrize("cell", CELLS)
def test_nan_stays_in_its_sequence(cell):
    """Holding and masking are selects: a NaN in one sequence reaches no other."""
    fused, ref = make_pair(cell, 3, 5, "triton", num_layers=2)
    x = random_input(4, 3, 3)
    x[1, 1, 0] = float("nan")
    y = fused(x.float())[0].detach()
    assert torch.isnan(y[1:, 1]).any()
    others = [0, 2]
    truth, base = ref.double()(x)[0][:, others], ref.float()(x.float())[0][:, others]
    assert rel_err(y[:, others], truth) <= FACTOR["output"] * rel_err(base, truth) + FLOOR[torch.float32]


def test_unsupported_dtype_is_a_clear_error():
    fused = make_pair("gru", 3, 4, "triton", dtype=torch.float64)[0]
    with pytest.raises(RuntimeError, match="triton.*float64.*not supported"):
        fused(random_input(2, 2, 3))
    assert "bfloat16" in triton_backend.unavailable_reason("cpu", torch.bfloat16, "gru")
    assert "CUDA" in triton_backend.unavailable_reason("mps", torch.float32, "gru")


def test_reason_names_the_interpreter(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    from fusedrnn.triton import common, lstm

    assert common.INTERPRETED == isinstance(lstm.lstm_forward_kernel, InterpretedFunction)
    monkeypatch.setattr(common, "INTERPRETED", False)
    assert "TRITON_INTERPRET=1" in triton_backend.unavailable_reason("cpu", torch.float32, "lstm")
    monkeypatch.setattr(common, "INTERPRETED", True)
    assert "unset TRITON_INTERPRET" in triton_backend.unavailable_reason("cuda", torch.float32, "lstm")


def test_reason_without_triton(monkeypatch):
    """A missing triton is reported, never raised: the kernels' first import fails as it would."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.delitem(sys.modules, "fusedrnn.triton.common")
    monkeypatch.delattr(triton_backend, "common")
    assert "pip install triton" in triton_backend.unavailable_reason("cpu", torch.float32, "lstm")



def test_tanh_has_float32_relative_precision():
    """The kernels' libdevice-free tanh against float64 over 18 decades, both signs, the switch at 0.625 and
    saturation; 2 sigmoid(2x) - 1 alone is off by ~1e-3 relative at 1e-5."""
    magnitudes = torch.cat([torch.logspace(-12, 6, 900, dtype=torch.float64),
                            torch.linspace(0.6, 0.65, 99, dtype=torch.float64)])
    x = torch.cat([magnitudes, -magnitudes]).float()
    y = torch.empty_like(x)
    _apply_tanh[(1,)](x, y, x.numel(), BLOCK=2048)
    want = torch.tanh(x.double())
    relative = ((y.double() - want).abs() / want.abs()).max().item()
    assert relative < 4 * torch.finfo(torch.float32).eps, relative
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])
    out = torch.empty_like(special)
    _apply_tanh[(1,)](special, out, 4, BLOCK=4)
    assert out[:2].tolist() == [1.0, -1.0] and out[2].isnan() and out[3] == 0.0


def _tf32_nearest(x):
    """x (a Python float, finite) rounded to nearest, ties to even, at tf32's precision (11 significant bits;
    fp32's exponent range, so below 2**-125 the spacing stays 2**-136): the spec, from frexp, not from bits."""
    if x == 0.0:
        return x
    exponent = math.frexp(x)[1]  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    spacing = max(exponent, -125) - 11
    return round(x / 2.0**spacing) * 2.0**spacing  # round() rounds half to even


def test_round_to_tf32_is_round_to_nearest_even():
    """The kernels' tf32 operand rounding (see common.round_to_tf32) against the spec: below, at and above
    the halfway point of the dropped 13 bits, ties both ways, both signs, subnormals, overflow, inf, NaN."""
    ulp = 2.0**-10
    values = [1 + f * ulp for f in (0.25, 0.4999, 0.5, 0.5001, 0.75, 1.5, 2.5)]
    values += [-v for v in values] + [3.0e-40, 1.2e-38, 1.0e-45, 3.4e38, 65504.0, 1e-3, 0.1, 1 / 3]
    x = torch.tensor(values, dtype=torch.float32)
    y = torch.empty_like(x)
    _apply_round[(1,)](x, y, x.numel(), BLOCK=64)
    want = torch.tensor([_tf32_nearest(v) for v in x.tolist()], dtype=torch.float64).float()  # 2**128 -> inf
    assert torch.equal(y, want), [(a, b, c) for a, b, c in zip(x.tolist(), y.tolist(), want.tolist()) if b != c]
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    out = torch.empty_like(special)
    _apply_round[(1,)](special, out, 3, BLOCK=4)
    assert out[:2].tolist() == [float("inf"), -float("inf")] and out[2].isnan()


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_tile_matmul_rounds_tf32_operands(precision):
    """tf32 products see operands rounded to nearest (1 + 0.75 ulp -> 1 + 1 ulp), not the raw fp32 bits the
    tensor cores would truncate (-> 1); ieee products see them exactly. The interpreter's dot is exact fp32."""
    K, a_value = 32, 1 + 0.75 * 2.0**-10
    a = torch.full((16, K), a_value)
    w = torch.ones(K, 16)
    out = torch.empty(16, 16)
    _apply_tile_matmul[(1,)](a, w, out, K, PRECISION=precision, BLOCK=16, BLOCK_K=16)
    operand = 1 + 2.0**-10 if precision == "tf32" else a_value
    assert torch.equal(out, torch.full((16, 16), K * operand))


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_layer_products_round_tf32_operands(allow_tf32):
    """The rounding reaches the recurrent product of a whole layer, in each variant (conftest.triton_variant): h0 =
    1 + 0.75 ulp (tf32's ulp, 2**-10) times a W_hh of 2**-6 over H = 64 units (two unit tiles in the split variant)
    sums exactly to h0's value in fp32; rounded to nearest first it is 1 + 1 ulp, truncated 1. y = tanh of it."""
    T, B, H, a_value = 1, 16, 64, 1 + 0.75 * 2.0**-10
    before, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, allow_tf32
    try:
        weights = LayerWeights(torch.zeros(H, 1), torch.full((H, H), 2.0**-6))
        y, *_ = triton_backend.forward("rnn_tanh", torch.zeros(T, B, 1), torch.full((B, H), a_value), None, weights,
                                       None, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    operand = 1 + 2.0**-10 if allow_tf32 else a_value
    want = torch.full((T, B, H), math.tanh(operand), dtype=torch.float64)
    torch.testing.assert_close(y.double(), want, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


if _REASON is None:  # kernels that apply the backends' jit helpers (jit functions resolve module globals)
    import triton
    import triton.language as tl

    from fusedrnn.triton.common import round_to_tf32 as _round_to_tf32
    from fusedrnn.triton.common import tanh as _tanh
    from fusedrnn.triton.common import tile_matmul as _tile_matmul

    @triton.jit
    def _apply_round(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(y_ptr + offsets, _round_to_tf32(tl.load(x_ptr + offsets, mask=mask)), mask=mask)

    @triton.jit
    def _apply_tile_matmul(a_ptr, w_ptr, out_ptr, K, PRECISION: tl.constexpr, BLOCK: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        """out (BLOCK, BLOCK) = a (BLOCK, K) @ w (K, BLOCK), all row-major."""
        idx = tl.arange(0, BLOCK)
        ok = idx < BLOCK
        acc = _tile_matmul(a_ptr, K, w_ptr, BLOCK, 1, idx, ok, idx, ok, K, PRECISION, BLOCK, BLOCK, BLOCK_K)
        tl.store(out_ptr + idx[:, None] * BLOCK + idx[None, :], acc)

    @triton.jit
    def _apply_tanh(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(y_ptr + offsets, _tanh(tl.load(x_ptr + offsets, mask=mask)), mask=mask)
