"""Build fusedrnn: pure Python always; optional compiled backends.

  FUSEDRNN_BUILD_CPP  = auto (default: build when a C++ compiler is found) | 1 (must build) | 0 (skip)
  FUSEDRNN_BUILD_CUDA = auto (default: build when torch has CUDA and nvcc is found) | 1 | 0

A skipped extension is built on first use instead (torch.utils.cpp_extension.load, cached), see
fusedrnn/cpp.py and fusedrnn/cuda.py: the C++ and CUDA sources (fusedrnn/csrc) ship with the package as package data.
The sources, the compiler flags, the CUDA toolkit and the GPU architectures come from fusedrnn/toolchain.py (no CUDA
variables need to be set; TORCH_CUDA_ARCH_LIST and CUDA_HOME still win).
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _wanted(flag, present):
    value = os.environ.get(flag, "auto").lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{flag} must be auto, 0 or 1, got {value!r}")
    if value == "1" and not present:
        raise SystemExit(f"{flag}=1 but the toolchain for it is missing")
    return value == "1" or (value == "auto" and present)


def _toolchain():
    """fusedrnn/toolchain.py, loaded by path: the package is not importable before it is installed."""
    spec = importlib.util.spec_from_file_location("fusedrnn_toolchain", HERE / "fusedrnn" / "toolchain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


TOOLCHAIN = _toolchain()


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only invocations
        return [], {}
    exts = []
    cpu, cuda = TOOLCHAIN.CPU, TOOLCHAIN.CUDA
    if _wanted("FUSEDRNN_BUILD_CPP", shutil.which(os.environ.get("CXX", "c++")) is not None):
        exts.append(
            cpp_extension.CppExtension(cpu.module, cpu.sources(HERE), extra_compile_args=list(cpu.cxx_flags),
                                       extra_link_args=list(cpu.ld_flags))
        )
    has_cuda = torch.version.cuda is not None and TOOLCHAIN.configure(cpp_extension) is not None
    if _wanted("FUSEDRNN_BUILD_CUDA", has_cuda):
        flags = {"cxx": list(cuda.cxx_flags), "nvcc": list(cuda.nvcc_flags)}
        exts.append(cpp_extension.CUDAExtension(cuda.module, cuda.sources(HERE), extra_compile_args=flags))
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)} if exts else {}
    return exts, cmdclass


ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["fusedrnn", "fusedrnn.*"]),
    package_data={"fusedrnn": list(TOOLCHAIN.PACKAGE_DATA), "fusedrnn.demo": ["timemachine.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
