"""The weight-gradient epilogue (fusedrnn/epilogue.py): its float32 block rule, and the reference following it.

The rule: a float32 sum over R rows (t, b) runs as ceil(R / BLOCK_ROWS) GEMMs over blocks of equal shares, block k
= [R*k // n, R*(k+1) // n), summed in float64. csrc/cpu fuses the same rule into its driver (tests/test_cpp.py pins
that one); here the Python side: sum_of_outer and, through it, the reference backend's weight gradients.
"""

import math

import pytest
import torch
from conftest import random_cotangents, random_layer_call

from fusedrnn import epilogue, reference
from fusedrnn.epilogue import BLOCK_ROWS, row_blocks, sum_of_outer

T, B = 41, 100  # 4,100 rows: three blocks of 1,366 / 1,367 / 1,367 rows, where 2,048-row chunks would be 2, 2, 4


def _float32_blocks_in_float64(a, b, bounds):
    """a: (T, B, M), b: (T, B, N) float32 -> (M, N) float32: one float32 GEMM per [begin, end) of ``bounds`` over
    the flattened rows, summed in float64 in block order."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    total = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64)
    for begin, end in bounds:
        total += a[begin:end].t() @ b[begin:end]
    return total.float()


@pytest.mark.parametrize("rows", [1, 2047, 2048, 2049, 4096, 4100, 40_000])
def test_row_blocks_are_the_fewest_equal_shares(rows):
    blocks = row_blocks(rows)
    n = math.ceil(rows / BLOCK_ROWS)
    assert blocks == [(rows * k // n, rows * (k + 1) // n) for k in range(n)]
    sizes = [end - begin for begin, end in blocks]
    assert max(sizes) <= BLOCK_ROWS and max(sizes) - min(sizes) <= 1


def test_sum_of_outer_is_the_float64_sum_of_float32_block_gemms():
    a, b = torch.randn(T, B, 12), torch.randn(T, B, 7)
    equal_shares = [(0, 1366), (1366, 2733), (2733, 4100)]
    got = sum_of_outer(a, b)
    assert got.dtype == torch.float32
    assert torch.equal(got, _float32_blocks_in_float64(a, b, equal_shares))
    # the test tells the rule from its neighbours: fixed 2,048-row chunks, or one float32 GEMM, round differently
    assert not torch.equal(got, _float32_blocks_in_float64(a, b, [(0, 2048), (2048, 4096), (4096, 4100)]))
    assert not torch.equal(got, a.reshape(-1, 12).t() @ b.reshape(-1, 7))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_sum_of_outer_is_one_gemm_in_other_dtypes(dtype):
    """float64 needs no blocks; half precision accumulates in float32 inside its one GEMM already."""
    a, b = torch.randn(T, B, 12, dtype=dtype), torch.randn(T, B, 7, dtype=dtype)
    assert torch.equal(sum_of_outer(a, b), a.reshape(-1, 12).t() @ b.reshape(-1, 7))


@pytest.mark.parametrize("cell,P", [("lstm", 3), ("gru", None)])
def test_reference_weight_grads_follow_the_block_rule(monkeypatch, cell, P):
    """The reference's dW_ih, dW_hh (and dW_hr with a projection) over 4,100 float32 rows are the rule's sums of
    the row-wise products its BPTT hands to the epilogue."""
    call = random_layer_call(cell, T, B, 6, 5, P, lengths=[T] * (B - 1) + [7], dtype=torch.float32)
    y, _, _, saved = reference.forward(*call)
    products = []
    original = epilogue.sum_of_outer
    monkeypatch.setattr(epilogue, "sum_of_outer", lambda a, b: products.append((a, b)) or original(a, b))
    _, _, _, grads = reference.backward(*call, y, saved, *random_cotangents(call, y))
    present = [name for name in ("w_ih", "w_hh", "w_hr") if getattr(call.weights, name) is not None]
    assert len(products) == len(present)
    by_shape = {(a.shape[-1], b.shape[-1]): (a, b) for a, b in products}  # (G*H, I), (G*H, P), (P, H) differ here
    for name in present:
        a, b = by_shape[tuple(getattr(grads, name).shape)]
        assert torch.equal(getattr(grads, name), _float32_blocks_in_float64(a, b, row_blocks(T * B))), name
