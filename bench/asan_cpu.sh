#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer check of the C++ CPU backend (fusedrnn/csrc/cpu).
#
# Builds fusedrnn/csrc/cpu with -fsanitize=address,undefined into a scratch directory (the normal build and
# torch's extension cache are left alone), preloads the sanitizer runtimes into Python (torch itself is not
# instrumented, so leak checking is off: CPython and torch keep memory until exit by design), makes the
# "cpp" backend load that build, and runs the tests that exercise it. The first sanitizer report stops the
# run with a non-zero exit status.
#
# Usage: bench/asan_cpu.sh [pytest arguments]    default: the cpp cases of the CPU test files
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
FUSEDRNN_ASAN_BUILD_DIR="$scratch" \
python - "$@" <<'PY'
import os
import sys

import pytest
import torch
from torch.utils import cpp_extension

from fusedrnn import toolchain

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
module = cpp_extension.load(
    name="fusedrnn_cpp_asan",
    sources=toolchain.CPU.sources(),
    extra_cflags=[*(f for f in toolchain.CPU.cxx_flags if not f.startswith("-O")), "-O1", "-g", *SANITIZE],
    extra_ldflags=[*toolchain.CPU.ld_flags, *SANITIZE],
    build_directory=os.environ["FUSEDRNN_ASAN_BUILD_DIR"],
)
sys.modules["fusedrnn._cpp"] = module  # fusedrnn/cpp.py imports its prebuilt extension from here first

import fusedrnn  # noqa: E402

reason = fusedrnn.backend._reason("cpp", "cpu", torch.float32, "lstm")
if reason is not None or fusedrnn.cpp._module() is not module:
    sys.exit(f"asan_cpu.sh: the cpp backend does not run the sanitized build ({reason})")
default = ["tests/test_modules.py", "tests/test_numerics.py", "tests/test_fuzz.py", "-k", "cpp"]
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *(sys.argv[1:] or default)]))
PY
