"""How the compiled backends are built: the sources, include directories and compiler flags of the C++ (CPU) and
CUDA extensions, the CUDA toolkit and the GPU architectures, in the one place that setup.py (ahead of time),
fusedrnn/cpp.py and fusedrnn/cuda.py (the build on first use) and the tests' builds all take them from.

The sources live inside the package (fusedrnn/csrc: cpu/, cuda/, testing/ for the CUDA host emulation) and are
installed with it as package data, so an install anywhere (a wheel included) can build on first use.

Two guesses of torch.utils.cpp_extension fail on an ordinary build machine without a GPU (a CI box, a
Docker build):
- the toolkit: torch takes CUDA_HOME as the parent of the directory holding the first ``nvcc`` on PATH, so a
  wrapper script or link such as /usr/local/bin/nvcc gives CUDA_HOME=/usr/local, where cuda_runtime_api.h is
  not. nvcc itself knows where it lives: its real path, else what it reports as its own directory
  (``nvcc --dryrun`` prints ``_HERE_=<its bin directory>``).
- the architectures: without TORCH_CUDA_ARCH_LIST torch asks the visible cards, and with none it fails
  (IndexError). Then DEFAULT_ARCHS is built: the generations the kernels are written and tuned for (sm_80,
  sm_90) plus PTX of the newest, which the driver compiles for later cards.
What the user has set (CUDA_HOME, CUDA_PATH, TORCH_CUDA_ARCH_LIST) always wins.

Imports nothing from fusedrnn: setup.py loads this file by path before the package is installed.
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
PACKAGE_DATA = ("csrc/*/*",)  # every source under CSRC ships with the package (setup.py's package_data)
DEFAULT_ARCHS = "8.0;9.0+PTX"
_HEADER = Path("include") / "cuda_runtime_api.h"


@dataclass(frozen=True)
class Extension:
    """One compiled backend: its module names, sources (globs under CSRC) and flags.

    module: the ahead-of-time build's import name (setup.py)   jit_name: torch.utils.cpp_extension.load's name
    (the build on first use)   cxx_flags / nvcc_flags / ld_flags: compiler and linker flags."""

    module: str
    jit_name: str
    patterns: tuple
    cxx_flags: tuple
    ld_flags: tuple = ()
    nvcc_flags: tuple = ()

    def sources(self, relative_to=None):
        """The source files, sorted; paths relative to `relative_to` (setup.py wants them relative) or absolute."""
        found = sorted(p for pattern in self.patterns for p in CSRC.glob(pattern))
        return [str(p.relative_to(relative_to) if relative_to else p) for p in found]


CPU = Extension("fusedrnn._cpp", "fusedrnn_cpp", ("cpu/*.cpp",), cxx_flags=("-O3", "-fopenmp"), ld_flags=("-fopenmp",))
CUDA = Extension("fusedrnn._cuda", "fusedrnn_cuda", ("cuda/*.cu", "cuda/binding.cpp"), cxx_flags=("-O3",),
                 nvcc_flags=("-O3", "-std=c++17"))
# The CUDA kernels and binding host-compiled against testing/host_emulation.h (tests/test_cuda_emulation.py):
# C++20 for std::barrier, and -fno-extern-tls-init for the kernels' block-scope `extern __shared__` (the header
# says why).
EMULATION_FLAGS = ("-std=c++20", "-O1", "-fno-extern-tls-init", "-Wno-unknown-pragmas")


def _reported_home(nvcc):
    """The toolkit root nvcc reports for itself (the parent of its _HERE_ directory), or None."""
    try:
        done = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^#\$ _HERE_=(.+)$", done.stdout + done.stderr, re.MULTILINE)
    return Path(found.group(1).strip()).parent if found else None


def find_cuda_home():
    """The CUDA toolkit root (the directory whose include/ holds cuda_runtime_api.h), or None without one.

    CUDA_HOME or CUDA_PATH when set; else the toolkit of the nvcc on PATH (its real path, then its own
    report); else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    candidates = [lambda: Path(os.path.realpath(nvcc)).parents[1], lambda: _reported_home(nvcc)] if nvcc else []
    candidates.append(lambda: Path("/usr/local/cuda"))
    for candidate in candidates:
        home = candidate()
        if home is not None and (home / _HEADER).exists():
            return home
    return None


def configure(cpp_extension):
    """Prepare torch's extension builder (the module torch.utils.cpp_extension) to compile CUDA here: its
    CUDA_HOME set to the toolkit found, and TORCH_CUDA_ARCH_LIST to DEFAULT_ARCHS when no card is visible.
    Returns the toolkit root, or None when there is none. Changes nothing the user has set."""
    import torch

    home = find_cuda_home()
    if home is not None and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = str(home)  # for the compiler subprocesses
        cpp_extension.CUDA_HOME = str(home)  # torch read its guess once, at import: replace it
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    return home
