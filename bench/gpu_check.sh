#!/usr/bin/env bash
# The one prepared GPU run (see bench/gpu_check.py: stages, limits, the summary):
#   bash bench/gpu_check.sh [OUT_DIR]        # OUT_DIR default: bench/results
# FUSEDRNN_COMMIT overrides the commit recorded (the device machine may have no .git).
cd "$(dirname "$0")/.." && exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
