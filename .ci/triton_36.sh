#!/usr/bin/env bash
# CI: the Triton kernels under triton 3.6.0, the version on the GPU image (the main test run has the newest): the
# interpreter tests and the sm_80 / sm_90 compile test (tensor cores, vector loads, zero stack), in their own virtual
# environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TMPDIR:-/tmp}/fusedrnn-ci-triton36"
rm -rf "$VENV"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0 triton==3.6.0 'numpy<2.4' pytest hypothesis setuptools wheel
FUSEDRNN_BUILD_CPP=0 pip install -q --no-build-isolation --no-deps -e .  # the Triton tests need no extension
python -c 'import triton; assert triton.__version__ == "3.6.0", triton.__version__'
python -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_triton_compile.py
python -m pytest -q -p no:cacheprovider tests/test_modules.py -k triton  # the module matrix's triton rows
