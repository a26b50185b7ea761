#!/usr/bin/env bash
# CI: the CUDA extension, built as a user without a GPU builds it (a CI box, a Docker build): a clean checkout,
# its own virtual environment with a CUDA build of torch, FUSEDRNN_BUILD_CUDA=1 and no CUDA variables set
# (fusedrnn/toolchain.py finds the toolkit and picks the architectures). Then fusedrnn._cuda must import (no GPU
# is needed to load it: every symbol resolves), its cell table (csrc/cuda/api.h) must be fusedrnn/cells.py's, and the
# backend must say "no CUDA device", not a build error. The sources and flags are fusedrnn/toolchain.py's
# (fusedrnn/csrc/cuda; fusedrnn/csrc/testing is the CPU tests' host emulation and is not built here).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${TMPDIR:-/tmp}/fusedrnn-ci-cuda"
rm -rf "$WORK"
git clone -q . "$WORK/src"  # the committed tree only
python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.14.1 ninja numpy setuptools wheel
cd "$WORK/src"
start=$(date +%s)
env -u CUDA_HOME -u CUDA_PATH -u TORCH_CUDA_ARCH_LIST FUSEDRNN_BUILD_CUDA=1 FUSEDRNN_BUILD_CPP=0 \
  pip install -q --no-build-isolation --no-deps -e .
echo "cuda_build: fusedrnn._cuda built in $(($(date +%s) - start)) s"
cd /  # import the installed package, not the source directory
env -u CUDA_HOME -u CUDA_PATH -u TORCH_CUDA_ARCH_LIST python - <<'PY'
import torch

import fusedrnn
import fusedrnn._cuda as ext
from fusedrnn import cells, cuda

assert torch.version.cuda, "this check needs a CUDA build of torch"
module, why = cuda._load()
assert module is ext and why is None, f"the loader did not take the built module: {why}"
table = {name: (cell.gates, cell.saved_rows) for name, cell in cells.CELLS.items()}
assert ext.cell_constants() == table, f"csrc/cuda/api.h's cell table {ext.cell_constants()} is not cells.py's {table}"
reason = cuda.unavailable_reason("cuda", torch.float32, "lstm")
assert not torch.cuda.is_available() and reason.startswith("no CUDA device"), reason
model = fusedrnn.LSTM(3, 4, backend="cuda")
try:
    model(torch.randn(2, 1, 3))
    raise AssertionError("the cuda backend ran without a CUDA device")
except RuntimeError as e:
    assert "CUDA device" in str(e), e
print(f"cuda_build: {ext.__file__} loads (torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"max_layers {ext.max_layers}); the backend says: {reason}")
PY
