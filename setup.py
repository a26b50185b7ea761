"""Build fusedrnn: pure Python always; optional compiled backends.

  FUSEDRNN_BUILD_CPP  = auto (default: build when a C++ compiler is found) | 1 (must build) | 0 (skip)
  FUSEDRNN_BUILD_CUDA = auto (default: build when torch has CUDA and nvcc is found) | 1 | 0

A skipped extension is built on first use instead (torch.utils.cpp_extension.load, cached), see
fusedrnn/cpp.py and fusedrnn/cuda.py.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup


def _wanted(flag, present):
    value = os.environ.get(flag, "auto").lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{flag} must be auto, 0 or 1, got {value!r}")
    if value == "1" and not present:
        raise SystemExit(f"{flag}=1 but the toolchain for it is missing")
    return value == "1" or (value == "auto" and present)


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
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if cuda_sources and _wanted("FUSEDRNN_BUILD_CUDA", has_cuda):
        exts.append(
            cpp_extension.CUDAExtension(
                "fusedrnn._cuda", cuda_sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17"]}
            )
        )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)} if exts else {}
    return exts, cmdclass


ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["fusedrnn", "fusedrnn.*"]),
    package_data={"fusedrnn.demo": ["timemachine.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
