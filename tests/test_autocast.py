"""Autocast: fused modules in a float32 model behave like torch.nn's under torch.autocast.

Same output dtypes as torch.nn (which differ by cell on the CPU), float32 gradients for float32 parameters, and
the oracle of conftest.py against float64 with the autocast dtype's floor. GradScaler trains.
"""

import pytest
import torch
from conftest import (
    CELLS,
    FACTOR,
    FLOOR,
    _flatten_out,
    cell_kwargs,
    kink_prone,
    make_pair,
    off_relu_kink,
    random_hx,
    random_input,
    rel_err,
)
from torch import nn

from fusedrnn.compile import compile_support

CPU_CASES = [(cell, 0) for cell in CELLS] + [("lstm", 3)]  # (cell, proj_size)
CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _leaf(t, like):
    return t.detach().to(like).requires_grad_()


def _run(model, x, hx, device, dtype):
    """Forward under autocast(device, dtype) (None: no autocast) and backward outside it, as training loops do.

    x, hx: float64 CPU tensors, fed as leaves in the model's dtype. -> (outputs, grads of x, hx, parameters)."""
    like = next(model.parameters())
    x = _leaf(x, like)
    hx = tuple(_leaf(h, like) for h in hx) if isinstance(hx, tuple) else _leaf(hx, like)
    with torch.autocast(device, dtype or torch.float32, enabled=dtype is not None):
        out = _flatten_out(model(x, hx))
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g).to(o) for o in out]
    leaves = [x, *(hx if isinstance(hx, tuple) else (hx,)), *model.parameters()]
    return [o.detach() for o in out], list(torch.autograd.grad(out, leaves, cotangents))


def _check_like_torch(cell, proj_size, device, dtype):
    fused, ref = make_pair(cell, 5, 7, num_layers=2, bidirectional=True, **cell_kwargs(cell, proj_size))
    x, hx = random_input(6, 3, 5), random_hx(cell, 4, 3, 7, proj_size=proj_size)
    if device == "cuda" and kink_prone(cell, dtype):  # relu in half precision: away from the kink (conftest says why)
        hx = off_relu_kink(fused, ref, x, hx)
    gold = _run(ref.double(), x, hx, "cpu", None)  # the truth: float64 throughout
    ref.float()
    fused, ref = fused.to(device), ref.to(device)
    got, base = _run(fused, x, hx, device, dtype), _run(ref, x, hx, device, dtype)
    for kind, factor in ((0, FACTOR["output"]), (1, FACTOR["grad"])):
        for i, (a, b, t) in enumerate(zip(got[kind], base[kind], gold[kind], strict=True)):
            assert a.dtype == b.dtype, f"{'out' if kind == 0 else 'grad'}[{i}]: {a.dtype}, torch.nn gives {b.dtype}"
            err_f, err_t = rel_err(a.cpu(), t), rel_err(b.cpu(), t)
            assert err_f <= factor * err_t + FLOOR[dtype], f"[{kind}][{i}]: {err_f:.3e} vs torch.nn {err_t:.3e}"


@pytest.mark.parametrize("cell,proj_size", CPU_CASES)
def test_cpu_bfloat16_like_torch(cell, proj_size):
    _check_like_torch(cell, proj_size, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("cell,proj_size", CPU_CASES)
def test_cuda_like_torch(cell, proj_size, dtype):
    _check_like_torch(cell, proj_size, "cuda", dtype)


@pytest.mark.parametrize("cell", CELLS)
def test_state_dtypes_without_hx_like_torch(cell):
    fused, ref = make_pair(cell, 4, 6, num_layers=2)
    x = torch.randn(5, 2, 4)
    with torch.autocast("cpu", torch.bfloat16):
        assert [t.dtype for t in _flatten_out(fused(x))] == [t.dtype for t in _flatten_out(ref(x))]


def test_autocast_under_torch_compile():
    fused = make_pair("gru", 4, 6, num_layers=2)[0]
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 4)
    with compile_support(), torch.autocast("cpu", torch.bfloat16):
        for got, want in zip(_flatten_out(compiled(x)), _flatten_out(fused(x)), strict=True):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "device,dtype",
    [("cpu", torch.bfloat16), pytest.param("cuda", torch.float16, marks=pytest.mark.gpu)],
    ids=str,
)
def test_grad_scaler_trains(device, dtype):
    fused = make_pair("lstm", 3, 8, device=device)[0]
    head = nn.Linear(8, 1, device=device)
    params = [*fused.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.02)
    scaler = torch.amp.GradScaler(device)
    x = torch.randn(6, 16, 3, device=device)
    target = x.sum(dim=(0, 2)).unsqueeze(1) / 5  # a sum over time: needs the recurrence
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        with torch.autocast(device, dtype):
            loss = nn.functional.mse_loss(head(fused(x)[0][-1]).float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in params)
    assert losses[-1] < 0.3 * losses[0], losses
