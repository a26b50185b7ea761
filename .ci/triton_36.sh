#!/usr/bin/env bash
# CI: the Triton kernels under triton 3.6.0, the version on the GPU image (the main test run has the newest):
# the interpreter tests, in their own virtual environment. Not the sm_80 / sm_90 compile test (test_triton_compile.py):
# under 3.6.0 four float32 forward kernels for sm_90 keep 8-16 bytes of stack where the newest triton keeps none (found
# 2026-11-29, README "What has run where"); it runs with the newest triton in the main test run.
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
python -m pytest -q -p no:cacheprovider tests/test_triton.py
