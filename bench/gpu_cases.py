"""Fixed, small GPU cases for bench/gpu_check.py's smoke and compute-sanitizer stages (a GPU is required).

    python bench/gpu_cases.py smoke       # under CUDA_LAUNCH_BLOCKING=1: a hang or fault names its case
    python bench/gpu_cases.py memcheck    # the case list compute-sanitizer memcheck runs
    python bench/gpu_cases.py racecheck   # the shorter list racecheck runs (the persistent scheme: the gemm
                                          # scheme's pointwise kernels touch no shared memory)

Each case runs a forward and a backward and prints one line when it is done, flushed, so that the log of a
stage cut off or crashed ends at the case that did not finish.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.nn.utils.rnn import pack_padded_sequence

from bench.measure import fused_twin, torch_rnn
from fusedrnn import cuda
from fusedrnn.cells import CELL_NAMES
from fusedrnn.triton import common as triton_common


def _model(cell, backend, dtype=torch.float32, **kwargs):
    """A fused I=5, H=6 model of cell running backend on the GPU; kwargs go to torch.nn's constructor."""
    return fused_twin(torch_rnn(cell, 5, 6, device="cuda", dtype=dtype, **kwargs), backend)


def _forward_backward(model, x, packed):
    """Outputs and the gradients of x and every parameter for sum(y^2); x: (T, B, I)."""
    x = x.detach().clone().requires_grad_()
    given = pack_padded_sequence(x, torch.tensor([4, 2, 3]), enforce_sorted=False) if packed else x
    y = model(given)[0]
    y = y.data if packed else y
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    return [y.detach(), *grads]


def _worst_error(got, want):
    return max(((g.double() - w).norm() / w.norm().clamp_min(1e-30)).item() for g, w in zip(got, want))


def smoke_case(name, cell, backend, scheme="auto", layers=1, bidirectional=False, packed=False):
    """One fused forward + backward against the reference backend in float64 on the same weights. scheme: the
    CUDA scheme, or for the triton backend its variant (persistent / split)."""
    cuda.SCHEME = scheme if backend == "cuda" else "auto"
    triton_common.VARIANT = scheme if backend == "triton" else "auto"
    torch.manual_seed(0)
    model = _model(cell, backend, num_layers=layers, bidirectional=bidirectional)
    gold = _model(cell, "reference", torch.float64, num_layers=layers, bidirectional=bidirectional)
    gold.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 5, device="cuda")
    error = _worst_error(_forward_backward(model, x, packed), _forward_backward(gold, x.double(), packed))
    torch.cuda.synchronize()
    ran = f"{model.last_backend}/" + (cuda.last_scheme() if backend == "cuda" else triton_common.VARIANT)
    assert model.last_backend == backend and (backend != "cuda" or scheme == "auto" or cuda.last_scheme() == scheme)
    assert error < 1e-4, f"{name}: relative error {error:.2e} against the float64 reference"
    print(f"smoke ok: {name} ({ran}): worst relative error {error:.1e}", flush=True)


def smoke():
    smoke_case("cuda persistent lstm, packed", "lstm", "cuda", "persistent", packed=True)
    smoke_case("cuda per-step gru, bidirectional", "gru", "cuda", "per_step", bidirectional=True)
    smoke_case("cuda wavefront stack, 2-layer lstm", "lstm", "cuda", "persistent", layers=2)
    smoke_case("cuda gemm lstm, packed", "lstm", "cuda", "gemm", packed=True)
    smoke_case("triton persistent lstm, packed", "lstm", "triton", "persistent", packed=True)
    smoke_case("triton split lstm, packed", "lstm", "triton", "split", packed=True)  # + 1 compile: the rest shared


def sanitize_case(cell, scheme, stack, **kwargs):
    """A bidirectional packed layer or a 2-layer stack with dropout (the wavefront), forward + backward, with
    every buffer the kernels write NaN-poisoned first."""
    cuda.SCHEME, cuda.POISON = scheme, True
    torch.manual_seed(0)
    shape = {"num_layers": 2, "dropout": 0.5} if stack else {"bidirectional": True}
    model = _model(cell, "cuda", **shape, **kwargs)
    _forward_backward(model, torch.randn(4, 3, 5, device="cuda"), packed=not stack)
    torch.cuda.synchronize()
    assert cuda.last_scheme() == scheme, (scheme, cuda.last_scheme())
    print(f"sanitized: {cell}{' proj' if kwargs else ''} {scheme} {'stack' if stack else 'packed'}", flush=True)


def memcheck():
    """Every kernel instantiation of float32 in the three schemes: every cell persistent, layer and stack; per
    step, the lstm with projection and the gru (the other cells share their per-step code paths); gemm, every
    cell's layer (forward and the backward's one-launch phases), the lstm with projection (the separate outs and
    units phases) and a stack (layer by layer, dropout between)."""
    for cell in CELL_NAMES:
        for stack in (False, True):
            sanitize_case(cell, "persistent", stack)
    sanitize_case("lstm", "persistent", False, proj_size=3)
    for stack in (False, True):
        sanitize_case("lstm", "per_step", stack, proj_size=3)
        sanitize_case("gru", "per_step", stack)
    for cell in CELL_NAMES:
        sanitize_case(cell, "gemm", False)
    sanitize_case("lstm", "gemm", False, proj_size=3)
    sanitize_case("lstm", "gemm", True)


def racecheck():
    """The persistent scheme, where shared memory holds the weights all sequence long and blocks pass state
    through the grid barrier: one layer and one stack of the lstm (with projection) and the gru, relu's layer."""
    for cell, kwargs in (("lstm", {"proj_size": 3}), ("gru", {})):
        for stack in (False, True):
            sanitize_case(cell, "persistent", stack, **kwargs)
    sanitize_case("rnn_relu", "persistent", False)


if __name__ == "__main__":
    {"smoke": smoke, "memcheck": memcheck, "racecheck": racecheck}[sys.argv[1]]()
