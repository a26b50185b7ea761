"""The Triton backend on a CUDA device vs cuDNN (torch.nn on CUDA) vs a float64 reference (conftest's oracle):
outputs within 2x cuDNN's error, gradients within 3x, never NaN. Awkward shapes (H=123, B=1, T=1, I != H,
a batch over several programs), large H, proj_size, packed lengths, tf32, and the book's model; both variants
(persistent, split).

Every test is marked ``gpu``: without CUDA conftest skips them, and nothing here touches CUDA at import.
"""

import pytest
import torch
from conftest import (
    CELLS,
    check_oracle,
    kink_prone,
    make_pair,
    num_states,
    off_relu_kink,
    random_hx,
    random_input,
    random_packed,
)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("triton_variant")]  # every test in both variants
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _triton_on_cuda():
    from fusedrnn import triton as triton_backend

    reason = triton_backend.unavailable_reason("cuda", torch.float32, "lstm")
    if reason is not None:
        pytest.skip(f"triton backend on CUDA: {reason}")


@pytest.fixture
def tf32():
    """float32 products in tf32 for the test (the kernels follow torch.backends.cuda.matmul.allow_tf32), and
    cuDNN's in tf32 too (its default; a strict float32 run turns it off): the baseline computes as we do."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _check(cell, x, H, dtype, layers=1, bidirectional=False, proj_size=0):
    """The oracle for a fused triton model vs torch.nn on CUDA; x: (T, B, I) float64 or a PackedSequence."""
    packed = isinstance(x, torch.nn.utils.rnn.PackedSequence)
    I, B = x.data.shape[-1], (int(x.batch_sizes[0]) if packed else x.shape[1])
    kwargs = {"proj_size": proj_size} if proj_size else {}
    fused, ref = make_pair(cell, I, H, "triton", num_layers=layers, bidirectional=bidirectional, **kwargs)
    hx = random_hx(cell, num_states(layers, bidirectional), B, H, proj_size=proj_size)
    if kink_prone(cell, dtype):  # relu in half precision: inputs away from the kink (conftest says why)
        hx = off_relu_kink(fused, ref, x, hx)
    check_oracle(fused, ref, x, hx, dtype=dtype, device="cuda")
    assert fused.last_backend == "triton"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(
    "T,B,I,H,layers,bidirectional",
    [
        (1, 1, 3, 123, 1, False),  # T=1, B=1, H=123
        (7, 5, 9, 123, 2, True),  # I != H, both directions
        (6, 40, 17, 64, 1, False),  # three programs, the last one partial
        (4, 8, 32, 1024, 1, False),  # large H: many tiles per step
    ],
)
def test_matches_cudnn(cell, dtype, T, B, I, H, layers, bidirectional):
    _check(cell, random_input(T, B, I), H, dtype, layers, bidirectional)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lstm_proj(dtype):
    _check("lstm", random_input(6, 5, 9), 123, dtype, layers=2, bidirectional=True, proj_size=61)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_packed(cell, dtype):
    _check(cell, random_packed([5, 1, 7, 3], 7), 123, dtype, layers=2, bidirectional=True)


def test_packed_lstm_proj():
    _check("lstm", random_packed([4, 6, 1], 7), 64, torch.float32, bidirectional=True, proj_size=20)


@pytest.mark.parametrize("cell", CELLS)
def test_tf32(cell, tf32):
    _check(cell, random_input(8, 16, 28), 256, torch.float32, layers=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_book_model(dtype):
    """The book's model: LSTM, T=35, B=32, I=28, H=256, 2 layers."""
    _check("lstm", random_input(35, 32, 28), 256, dtype, layers=2)


@pytest.mark.parametrize("triton_variant", ["split"], indirect=True)  # it launches the split variant itself: once
def test_split_variant_replays_repeated_launches_from_a_cuda_graph(monkeypatch):
    """The same split-variant launches three times with the same pointers (what a training loop gives): run
    directly, then captured and replayed, then replayed. Every run writes the same y, and it is the recurrence's."""
    import collections

    from fusedrnn.triton import common, rnn

    monkeypatch.setattr(common, "_GRAPHS", collections.OrderedDict())
    T, B, H = 5, 3, 40
    x = torch.empty(T, B, 7, device="cuda")  # the launch reads only its shape and device
    gx, h0 = torch.randn(T, B, H, device="cuda"), torch.randn(B, H, device="cuda")
    w_hh, b_hh = torch.randn(H, H, device="cuda") / H**0.5, torch.randn(H, device="cuda")
    y = torch.empty(T, B, H, device="cuda")
    args = (gx, h0, w_hh, b_hh, h0, y, T, B, H)  # h0 stands in for the absent lengths
    runs = []
    for _ in range(3):
        y.fill_(float("nan"))
        common.launch(rnn.rnn_forward_kernel, x, H, args, [(common.UNITS, H)], True, RELU=False, REVERSE=False,
                      HAS_BIAS=True, HAS_LENGTHS=False)
        runs.append(y.clone())
    assert [graph is not None for graph in common._GRAPHS.values()] == [True]
    h, want = h0.double(), []
    for t in range(T):
        h = torch.tanh(gx[t].double() + h @ w_hh.double().T + b_hh.double())
        want.append(h)
    torch.testing.assert_close(runs[0].double(), torch.stack(want), rtol=1e-5, atol=1e-5)
    assert torch.equal(runs[1], runs[0]) and torch.equal(runs[2], runs[0])
