"""Ahead-of-time compilation of every Triton kernel for real GPU targets, on a machine without a GPU.

The interpreter (tests/test_triton.py) runs the kernels as Python and never meets Triton's GPU compiler;
this compiles each kernel, with the exact arguments its launcher passes, down to a cubin for sm_90 (and
sm_80) with triton.compile(ASTSource(...), target=GPUTarget(...)), which catches what only the GPU path
checks: tl.dot operand shapes and dtypes, layouts, unsupported ops, type errors in untaken branches. It also
checks that fp16/bf16 and tf32 products reach tensor cores (mma in the PTX) and that exact fp32 does not, and
that no kernel spills registers (no stack frame in the cubin's resource usage). Both variants (common.py) launch
the same kernels with the same options.
It does NOT run anything on a GPU: numerical validation on a GPU is tests/test_triton_gpu.py.

The kernels must be built without the interpreter, so the work runs in a subprocess with
TRITON_INTERPRET=0 (this file run as a script); the test reads its JSON report.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

H = 256  # hidden units: the launchers' GPU tile sizes (the caps), not the tiny test sizes
ARCHS = (90, 80)  # the register budget and pipelining differ between them (common.launch_options)
# (cell, dtype, proj_size or 0, optional inputs and reverse on, arch, allow_tf32)
CASES = [
    *[(cell, dtype, 128 if cell == "lstm" else 0, True, arch, False)
      for arch in ARCHS for dtype in ("float32", "float16", "bfloat16") for cell in ("lstm", "gru", "rnn_relu")],
    *[(cell, "float32", 0, False, arch, False) for arch in ARCHS for cell in ("lstm", "rnn_tanh")],
    *[("lstm", "float32", 128, True, arch, True) for arch in ARCHS],
    # P not a multiple of 16: unspecialized strides (spilled once)
    *[("lstm", "float32", 100, True, arch, False) for arch in ARCHS],
]
_POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "int64": "*i64"}


def _layer_call(cell, dtype, P, full):
    """Arguments of one backend call (reference.py's contract) at GPU-sized H; values are irrelevant."""
    import torch

    from fusedrnn.cells import CELLS, LayerWeights

    T, B, I, G = 2, 3, 5, CELLS[cell].gates
    P = P or H

    def z(*shape):
        return torch.zeros(shape, dtype=getattr(torch, dtype))

    weights = LayerWeights(z(G * H, I), z(G * H, P), z(G * H) if full else None, z(G * H) if full else None,
                           z(P, H) if P != H else None)
    c0 = z(B, H) if CELLS[cell].has_c else None
    return (cell, z(T, B, I), z(B, P), c0, weights, torch.full((B,), T) if full else None, full)


def _compile_case(cell, dtype, P, full, arch, tf32):
    """Record the launches of one layer's forward and backward and compile each for sm_<arch>."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import fusedrnn.triton as backend
    from fusedrnn.triton import common

    launches = []
    options = common.launch_options(getattr(torch, dtype), divmod(arch, 10))
    common.launch = lambda kernel, x, H, args, phases, split, **flags: launches.append(
        (kernel, (*args, 0, x.shape[0], 1, H), {**common.tuning(x, H), **flags}, options))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    call = _layer_call(cell, dtype, P, full)
    y, h_n, c_n, saved = backend.forward(*call)
    backend.backward(*call, y, saved, torch.zeros_like(y), h_n, c_n)
    report = []
    for kernel, args, constexprs, compile_options in launches:
        signature = {name: _POINTER_TYPES[str(a.dtype).removeprefix("torch.")] if torch.is_tensor(a) else "i32"
                     for name, a in zip(kernel.arg_names, args)}
        signature.update({name: "constexpr" for name in constexprs})
        attrs = _jit_attrs([None if name in kernel.do_not_specialize else a for name, a in zip(kernel.arg_names, args)])
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=compile_options)
        report.append(dict(kernel=kernel.fn.__name__, case=[cell, dtype, P, full, arch, tf32],
                           precision=constexprs["PRECISION"], mma="mma" in compiled.asm["ptx"],
                           scalar_half_loads=len(re.findall(r"ld\.global(\.\w+)*\.b16\b", compiled.asm["ptx"])),
                           cubin_bytes=len(compiled.asm["cubin"]), shared=compiled.metadata.shared,
                           **_resources(compiled.asm["cubin"])))
    return report


def _jit_attrs(args):
    """What Triton's launcher specializes on at run time, for arguments like these (None: an argument it does not
    specialize): tensors whose address is 16-byte aligned (fresh allocations are) and integers divisible by 16 are
    marked divisible by 16. Without
    them the compiler must assume any alignment and loads every element on its own."""
    import torch

    return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(args)
            if torch.is_tensor(a) or (isinstance(a, int) and a % 16 == 0)}


def _resources(cubin):
    """Registers and stack bytes (spills) of the cubin Triton built, from the cuobjdump its package ships."""
    import tempfile

    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True, check=True)
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", done.stdout).groups()
    return {"registers": int(registers), "stack": int(stack)}


def _main():
    print(json.dumps([entry for case in CASES for entry in _compile_case(*case)]))


def test_kernels_compile_for_gpu_targets():
    pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend to compile with")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, __file__], env=env, check=False, capture_output=True, text=True,
                         cwd=root)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(report) == 2 * len(CASES)  # a forward and a backward kernel per case
    for entry in report:
        _, dtype, *_ = entry["case"]
        tensor_cores = dtype != "float32" or entry["precision"] == "tf32"
        assert entry["mma"] == tensor_cores, entry
        assert entry["cubin_bytes"] > 0
        assert entry["stack"] == 0, entry  # spilled registers: local-memory traffic on every step
        if dtype != "float32":  # H and P are multiples of 16 here: every half load is a vector (or cp.async)
            assert entry["scalar_half_loads"] == 0, entry


if __name__ == "__main__":
    _main()
