"""Build fusedrnn: pure Python always; optional compiled backends.

  FUSEDRNN_BUILD_CPP  = auto (default: build when a C++ compiler is found) | 1 (must build) | 0 (skip)
  FUSEDRNN_BUILD_CUDA = auto (default: build when torch has CUDA and nvcc is found) | 1 | 0

A skipped extension is built on first use instead (torch.utils.cpp_extension.load, cached), see
fusedrnn/cpp.py and fusedrnn/cuda.py. The CUDA toolkit, the GPU architectures and the compiler flags come from
fusedrnn/toolchain.py (no CUDA variables need to be set; TORCH_CUDA_ARCH_LIST and CUDA_HOME still win).
"""

import glob
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup


def _wanted(flag, present):
    value = os.environ.get(flag, "auto").lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{flag} must be auto, 0 or 1, got {value!r}")
    if value == "1" and not present:
        raise SystemExit(f"{flag}=1 but the toolchain for it is missing")
    return value == "1" or (value == "auto" and present)


def _toolchain():
    """fusedrnn/toolchain.py, loaded by path: the package is not importable before it is installed."""
    spec = importlib.util.spec_from_file_location("fusedrnn_toolchain", Path(__file__).parent / "fusedrnn/toolchain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only invocations
        return [], {}
    exts = []
    cpp_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if cpp_sources and _wanted("FUSEDRNN_BUILD_CPP", shutil.which(os.environ.get("CXX", "c++")) is not None):
        exts.append(
            cpp_extension.CppExtension(
                "fusedrnn._cpp", cpp_sources, extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"]
            )
        )
    cuda_sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*_binding.cpp"))
    toolchain = _toolchain()
    has_cuda = torch.version.cuda is not None and toolchain.configure(cpp_extension) is not None
    if cuda_sources and _wanted("FUSEDRNN_BUILD_CUDA", has_cuda):
        flags = {"cxx": toolchain.CXX_FLAGS, "nvcc": toolchain.NVCC_FLAGS}
        exts.append(cpp_extension.CUDAExtension("fusedrnn._cuda", cuda_sources, extra_compile_args=flags))
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)} if exts else {}
    return exts, cmdclass


ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["fusedrnn", "fusedrnn.*"]),
    package_data={"fusedrnn.demo": ["timemachine.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
