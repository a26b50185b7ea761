"""fusedrnn modules vs torch.nn on the CPU: outputs, final states and every gradient, for every CPU backend.

float64 must match torch.nn to ~1e-12; float32 is held to the oracle in conftest.py."""

import pytest
import torch
from conftest import AWKWARD_SHAPES, CELLS, SHAPE_ARGS, check_oracle, make_pair, random_hx, random_input, random_packed

import fusedrnn

CPU_BACKENDS = [b for b in fusedrnn.available_backends("cpu") if b != "triton"]  # triton: test_triton.py
DTYPES = (torch.float64, torch.float32)


def _states(bidirectional, layers):
    return layers * (2 if bidirectional else 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(
    SHAPE_ARGS,
    [*AWKWARD_SHAPES, (3, 2, 5, 8, 3, True)],
)
def test_matches_torch(backend, dtype, cell, T, B, I, H, layers, bidirectional):
    fused, ref = make_pair(cell, I, H, backend, num_layers=layers, bidirectional=bidirectional)
    hx = random_hx(cell, _states(bidirectional, layers), B, H)
    check_oracle(fused, ref, random_input(T, B, I), hx, dtype=dtype)
    assert fused.last_backend == backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_proj(backend, dtype, bidirectional):
    fused, ref = make_pair("lstm", 5, 9, backend, num_layers=2, proj_size=4, bidirectional=bidirectional)
    hx = random_hx("lstm", _states(bidirectional, 2), 3, 9, proj_size=4)
    check_oracle(fused, ref, random_input(6, 3, 5), hx, dtype=dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", CELLS)
def test_no_bias_batch_first_no_hx(backend, cell):
    fused, ref = make_pair(cell, 4, 7, backend, num_layers=2, bias=False, batch_first=True)
    check_oracle(fused, ref, random_input(5, 3, 4, batch_first=True), None, dtype=torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched(backend, cell, batch_first):
    fused, ref = make_pair(cell, 4, 6, backend, num_layers=2, bidirectional=True, batch_first=batch_first)
    hx = random_hx(cell, 4, 1, 6)
    hx = tuple(h[:, 0] for h in hx) if isinstance(hx, tuple) else hx[:, 0]
    check_oracle(fused, ref, torch.randn(5, 4, dtype=torch.float64), hx, dtype=torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed(backend, cell, enforce_sorted, bidirectional):
    lengths = [5, 4, 2, 1] if enforce_sorted else [2, 5, 1, 4]
    fused, ref = make_pair(cell, 3, 6, backend, num_layers=2, bidirectional=bidirectional)
    packed = random_packed(lengths, 3, enforce_sorted=enforce_sorted)
    hx = random_hx(cell, _states(bidirectional, 2), len(lengths), 6)
    for dtype in DTYPES:
        check_oracle(fused, ref, packed, hx, dtype=dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_lstm_proj(backend):
    fused, ref = make_pair("lstm", 3, 6, backend, num_layers=2, bidirectional=True, proj_size=2)
    packed = random_packed([3, 6, 1], 3)
    check_oracle(fused, ref, packed, random_hx("lstm", 4, 3, 6, proj_size=2), dtype=torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", CELLS)
def test_dropout_between_layers(backend, cell):
    """Dropout masks come from the same RNG draws as torch.nn's, so train() outputs match exactly."""
    fused, ref = make_pair(cell, 4, 8, backend, num_layers=3, dropout=0.5, dtype=torch.float64)
    x = random_input(6, 3, 4)
    fused.train(), ref.train()
    torch.manual_seed(7)
    y_fused = fused(x)[0]
    torch.manual_seed(7)
    y_ref = ref(x)[0]
    torch.testing.assert_close(y_fused, y_ref, rtol=1e-12, atol=1e-12)
    fused.eval(), ref.eval()
    torch.testing.assert_close(fused(x)[0], ref(x)[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y_fused, fused(x)[0])  # train() really dropped something


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", CELLS)
def test_nan_stays_in_its_sequence(backend, cell):
    fused, ref = make_pair(cell, 3, 5, backend, num_layers=2, dtype=torch.float64)
    x = random_input(4, 3, 3)
    x[1, 1, 0] = float("nan")
    y, _ = fused(x)
    assert torch.isnan(y[1:, 1]).any()
    assert torch.isfinite(y[:, [0, 2]]).all()
    torch.testing.assert_close(y[:, [0, 2]], ref(x)[0][:, [0, 2]], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(backend, cell):
    fused = make_pair(cell, 3, 4, backend, num_layers=2, bidirectional=True, dtype=torch.float64)[0]
    x = random_input(3, 2, 3).requires_grad_()
    hx = random_hx(cell, 4, 2, 4)
    hx = tuple(h.requires_grad_() for h in hx) if isinstance(hx, tuple) else hx.requires_grad_()
    hx = hx if isinstance(hx, tuple) else (hx,)
    names = [n for n, _ in fused.named_parameters()]

    def f(x, *tensors):
        states, weights = tensors[: len(hx)], tensors[len(hx) :]
        state = states if len(states) == 2 else states[0]
        out, hidden = torch.func.functional_call(fused, dict(zip(names, weights)), (x, state))
        return (out, *(hidden if isinstance(hidden, tuple) else (hidden,)))

    assert torch.autograd.gradcheck(f, (x, *hx, *fused.parameters()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lengths_packed_gradcheck(backend):
    fused = make_pair("lstm", 2, 3, backend, bidirectional=True, dtype=torch.float64)[0]
    data = random_packed([3, 1, 2], 2)
    leaf = data.data.detach().requires_grad_()

    def f(d):
        packed = torch.nn.utils.rnn.PackedSequence(d, data.batch_sizes, data.sorted_indices, data.unsorted_indices)
        out, (h, c) = fused(packed)
        return out.data, h, c

    assert torch.autograd.gradcheck(f, (leaf,))
