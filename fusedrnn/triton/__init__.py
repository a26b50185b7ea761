"""The Triton backend: fused recurrences for LSTM (with proj_size), GRU and RNN, forward and backward.

Contract and math: fusedrnn/reference.py (saved activations in every backend's layout, fusedrnn/cells.py).
Per layer-direction: the input projection x W_ih^T + b_ih for all steps as one torch GEMM (cuBLAS), then
ONE persistent kernel launch that loops over time (see common.py for the design); backward likewise, then
the weight and input gradients as torch GEMMs over all steps. Kernels: lstm.py, gru.py, rnn.py.

Precision: fp32, fp16 and bf16 tensors; every product accumulates in fp32, states h (in y) are stored in
x's dtype and the carried c, dh, dc in fp32. float32 products use tf32 exactly when
torch.backends.cuda.matmul.allow_tf32 is set (default off), like the layer's torch GEMMs.

Where it runs: CUDA devices of compute capability >= 8.0 with triton importable; CPU tensors only through
Triton's interpreter (TRITON_INTERPRET=1 before fusedrnn is imported), a testing aid without bfloat16.
Importing this module never imports triton; the kernels load on first use.
"""

import importlib

import torch

_KERNEL_MODULES = {"lstm": "lstm", "gru": "gru", "rnn_tanh": "rnn", "rnn_relu": "rnn"}
_DTYPES = {"cuda": (torch.float32, torch.float16, torch.bfloat16), "cpu": (torch.float32, torch.float16)}
_MIN_CAPABILITY = (8, 0)


def _kernels(cell):
    return importlib.import_module(f".{_KERNEL_MODULES[cell]}", __name__)


def forward(cell, x, h0, c0, weights, lengths, reverse, save=True):
    y, h_n, c_n, saved = _kernels(cell).forward(cell, x, h0, c0, weights, lengths, reverse)
    return y, h_n, c_n, saved if save else saved.new_empty(0)


def backward(cell, x, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n, need_dx=True):
    return _kernels(cell).backward(cell, x, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n, need_dx)


def unavailable_reason(device, dtype, cell):
    """Why this backend cannot run (device type, dtype, cell), naming the fix; None when it can."""
    try:
        from . import common  # imports triton
    except ImportError as e:
        return f"triton cannot be imported ({e}); install it with `pip install triton`"
    if device == "cpu" and not common.INTERPRETED:
        return ("Triton runs on CPU tensors only in its interpreter, a testing aid: set TRITON_INTERPRET=1 "
                "before importing fusedrnn, or move the model to CUDA")
    if device == "cuda":
        reason = _cuda_reason(common.INTERPRETED)
        if reason:
            return reason
    if device not in _DTYPES:
        return f"Triton kernels run on CUDA devices only, not on {device!r}"
    if dtype not in _DTYPES[device]:
        names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES[device])
        where = "in the interpreter (CPU tensors)" if device == "cpu" else "on CUDA"
        return f"{dtype} is not supported {where} (supported: {names}); use backend='reference' or another dtype"
    return None


def _cuda_reason(interpreted):
    if interpreted:
        return ("the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET was set when fusedrnn "
                "loaded them): unset TRITON_INTERPRET to run CUDA tensors")
    if not torch.cuda.is_available():
        return "CUDA is not available to torch"
    capability = torch.cuda.get_device_capability()
    if capability < _MIN_CAPABILITY:
        return f"the GPU has compute capability {capability}, the kernels need >= {_MIN_CAPABILITY} (sm_80)"
    return None
