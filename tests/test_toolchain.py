"""fusedrnn/toolchain.py, the one build config: the sources and flags every build reads (setup.py, cpp.py and cuda.py
restate none), and the CUDA build finding its toolkit and architectures without CUDA variables, as on a build
machine without a GPU (the real build: .ci/cuda_build.sh; an installed wheel's build: test_wheel_install.py)."""

import os
import re
import types
from pathlib import Path

import pytest

from fusedrnn import toolchain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_cuda_variables(monkeypatch):
    for var in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.setenv(var, "")  # records the value to restore, also what configure() sets in the test
        monkeypatch.delenv(var)


def _toolkit(root):
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime_api.h").write_text("")
    return root


def _nvcc_on_path(monkeypatch, directory, script):
    directory.mkdir(parents=True, exist_ok=True)
    nvcc = directory / "nvcc"
    nvcc.write_text(script)
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return nvcc


def test_a_wrapper_nvcc_is_asked_where_it_lives(tmp_path, monkeypatch, no_cuda_variables):
    """/usr/local/bin/nvcc as a script that execs the toolkit's: torch would take /usr/local; nvcc's own report
    (_HERE_ in --dryrun) names the toolkit."""
    kit = _toolkit(tmp_path / "cuda-13.0")
    _nvcc_on_path(monkeypatch, tmp_path / "wrapper" / "bin", f"#!/bin/sh\necho '#$ _HERE_={kit}/bin' >&2\n")
    assert toolchain.find_cuda_home() == kit


def test_a_linked_nvcc_gives_the_toolkit_of_its_real_path(tmp_path, monkeypatch, no_cuda_variables):
    kit = _toolkit(tmp_path / "cuda-13.0")
    real = _nvcc_on_path(monkeypatch, kit / "bin", "#!/bin/sh\nexit 1\n")  # never asked: the path is enough
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "nvcc").symlink_to(real)
    monkeypatch.setenv("PATH", f"{tmp_path / 'links'}{os.pathsep}{os.environ['PATH']}")
    assert toolchain.find_cuda_home() == kit


def test_the_users_cuda_home_wins(tmp_path, monkeypatch, no_cuda_variables):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert toolchain.find_cuda_home() == tmp_path


def test_configure_sets_only_what_is_unset(tmp_path, monkeypatch, no_cuda_variables):
    import torch

    kit = _toolkit(tmp_path / "kit")
    monkeypatch.setattr(toolchain, "find_cuda_home", lambda: kit)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    builder = types.SimpleNamespace(CUDA_HOME="/usr/local")  # torch's guess from /usr/local/bin/nvcc
    assert toolchain.configure(builder) == kit
    assert builder.CUDA_HOME == os.environ["CUDA_HOME"] == str(kit)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == toolchain.DEFAULT_ARCHS == "8.0;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setenv("CUDA_HOME", "/opt/cuda")
    builder = types.SimpleNamespace(CUDA_HOME="/opt/cuda")
    toolchain.configure(builder)
    assert (builder.CUDA_HOME, os.environ["TORCH_CUDA_ARCH_LIST"]) == ("/opt/cuda", "9.0")


def test_the_sources_are_the_packages_by_target():
    """The CPU extension is every csrc/cpu/*.cpp; the CUDA one every csrc/cuda kernel file and its binding; the
    host emulation (csrc/testing) is in neither."""
    cpu, cuda = toolchain.CPU.sources(toolchain.CSRC), toolchain.CUDA.sources(toolchain.CSRC)
    assert cpu == sorted(f"cpu/{p.name}" for p in (toolchain.CSRC / "cpu").glob("*.cpp")) and "cpu/binding.cpp" in cpu
    assert sorted(cuda) == sorted([*(f"cuda/{p.name}" for p in (toolchain.CSRC / "cuda").glob("*.cu")),
                                   "cuda/binding.cpp"])
    assert toolchain.CPU.sources()[0] == str(toolchain.CSRC / cpu[0])  # absolute without relative_to


@pytest.mark.parametrize("path", ["setup.py", "fusedrnn/cpp.py", "fusedrnn/cuda.py"])
def test_no_build_restates_a_flag_or_a_source(path):
    """Flags and source lists live in toolchain.py only: the builds read them from there."""
    text = (ROOT / path).read_text()
    assert not re.search(r"[\"'](-O\d|-fopenmp|-std=|-gencode)", text), f"{path} restates a compiler flag"
    assert not re.search(r"glob\(|\.cpp[\"']|\.cu[\"']", text), f"{path} lists sources itself"
