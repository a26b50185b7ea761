"""fusedrnn modules vs torch.nn on the CPU: outputs, final states and every gradient, for every CPU backend.

float64 must match torch.nn to ~1e-12; float32 is held to the oracle in conftest.py. ``test_matches_torch`` is
the one matrix of model-and-input cases per backend and dtype (batched, unbatched, packed, with and without hx);
the GPU's is in test_cuda.py and test_triton_gpu.py, random ones in test_fuzz.py."""

import itertools

import pytest
import torch
from conftest import (
    AWKWARD_SHAPES,
    CELLS,
    DEVICE_BACKENDS,
    TRITON_VARIANTS,
    Case,
    case_id,
    check_case,
    make_pair,
    on_backends,
    random_hx,
    random_input,
    random_packed,
)

DTYPES = (torch.float64, torch.float32)
NOT_INTERPRETED = ("triton",)  # the Triton interpreter runs its own, smaller cases below (far too slow for these)
NATIVE = tuple(b for b in DEVICE_BACKENDS["cpu"] if b not in NOT_INTERPRETED)


def _batched(cells, shapes, **kwargs):
    """Cases from (T, B, I, H, layers, bidirectional) shapes; kwargs: more constructor keywords."""
    return [Case(cell, I, H, T, B, {"num_layers": layers, "bidirectional": bidirectional, **kwargs})
            for cell in cells for T, B, I, H, layers, bidirectional in shapes]


def _packed(cells, lengths, I, H, enforce_sorted=False, **kwargs):
    return [Case(cell, I, H, max(lengths), len(lengths), kwargs, "packed", tuple(lengths), enforce_sorted)
            for cell in cells]


NATIVE_CASES = [  # NATIVE backends, float64 and float32
    *_batched(CELLS, [*AWKWARD_SHAPES, (3, 2, 5, 8, 3, True)]),
    *(Case("lstm", 5, 9, 6, 3, {"num_layers": 2, "proj_size": 4, "bidirectional": d}) for d in (False, True)),
    *(c for d in (False, True) for c in _packed(CELLS, [5, 4, 2, 1], 3, 6, True, num_layers=2, bidirectional=d)),
    *(c for d in (False, True) for c in _packed(CELLS, [2, 5, 1, 4], 3, 6, num_layers=2, bidirectional=d)),
]
FLOAT64_CASES = [  # NATIVE backends, float64 only
    *(Case(cell, 4, 6, 5, 1, {"num_layers": 2, "bidirectional": True, "batch_first": f}, "unbatched")
      for cell in CELLS for f in (False, True)),
    *(Case(cell, 4, 7, 5, 3, {"num_layers": 2, "bias": False, "batch_first": True}, with_hx=False) for cell in CELLS),
    *_packed(["lstm"], [3, 6, 1], 3, 6, num_layers=2, bidirectional=True, proj_size=2),
]
SHORT_CASES = [  # cpp's decode driver (T <= 8: fusedrnn/cpp.py), float64 and float32
    *(Case(cell, 7, 19, T, B, {"num_layers": 2, "bias": bias, "bidirectional": d})
      for cell in CELLS for T, B, bias, d in [(1, 1, True, False), (2, 32, False, True), (8, 2, True, True)]),
    *_packed(["lstm"], [2, 1, 2], 5, 9, num_layers=2, proj_size=4, bidirectional=True),
    # steps large enough for the direct driver's team split by units (csrc/cpu/forward.h: direct_team)
    *_batched(CELLS, [(1, 4, 96, 256, 1, True), (2, 4, 96, 256, 1, True)]),
    Case("lstm", 96, 256, 2, 4, {"proj_size": 64, "bidirectional": True}),
    *_packed(["lstm"], [2, 1, 2, 1], 96, 256, bidirectional=True),
    # one or two steps that take the packed driver in float32 with 2 threads (csrc/cpu/forward.h: direct_pays)
    *_batched(["lstm", "gru"], [(1, 32, 256, 256, 1, False), (2, 32, 256, 256, 1, True)]),
]
INTERPRETED_CASES = [  # triton on CPU tensors (its interpreter), float32, every kernel variant
    *_batched(CELLS, [(4, 3, 5, 20, 1, False), (1, 1, 3, 7, 2, True), (3, 4, 6, 32, 2, True)]),
    *_batched(["lstm"], [(4, 3, 5, 9, 1, False), (4, 3, 5, 9, 2, True)], proj_size=4),
    *_packed(CELLS, [2, 4, 1, 3], 3, 6, num_layers=2, bidirectional=True),
    *_packed(["lstm"], [3, 4, 1], 3, 6, bidirectional=True, proj_size=2),
    *(Case(cell, 4, 7, 3, 2, {"bias": False, "batch_first": True}, with_hx=False) for cell in CELLS),
]


def _rows(backends, dtypes, cases, variants=(None,)):
    """(backend, Triton variant, dtype, case) params, one per combination, with readable ids."""
    def row(backend, variant, dtype, case):
        words = (backend, variant, str(dtype).removeprefix("torch."), case_id(case))
        return pytest.param(backend, variant, dtype, case, id="-".join(w for w in words if w))

    return [row(*combination) for combination in itertools.product(backends, variants, dtypes, cases)]


MATRIX = [
    *_rows(NATIVE, DTYPES, NATIVE_CASES),
    *_rows(NATIVE, (torch.float64,), FLOAT64_CASES),
    *_rows(("cpp",), DTYPES, SHORT_CASES),
    *_rows(("triton",), (torch.float32,), INTERPRETED_CASES, TRITON_VARIANTS),
]


@pytest.mark.parametrize("backend,triton_variant,dtype,case", MATRIX, indirect=["backend", "triton_variant"])
def test_matches_torch(backend, triton_variant, dtype, case):
    check_case(case, backend, dtype)


@on_backends(exclude=NOT_INTERPRETED)
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


@on_backends(exclude=NOT_INTERPRETED)
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


@on_backends(exclude=NOT_INTERPRETED)
def test_lengths_packed_gradcheck(backend):
    fused = make_pair("lstm", 2, 3, backend, bidirectional=True, dtype=torch.float64)[0]
    data = random_packed([3, 1, 2], 2)
    leaf = data.data.detach().requires_grad_()

    def f(d):
        packed = torch.nn.utils.rnn.PackedSequence(d, data.batch_sizes, data.sorted_indices, data.unsorted_indices)
        out, (h, c) = fused(packed)
        return out.data, h, c

    assert torch.autograd.gradcheck(f, (leaf,))
