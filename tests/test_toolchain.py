"""fusedrnn/toolchain.py: the CUDA build finds its toolkit and architectures without CUDA variables, as on a
build machine without a GPU (the real build: .ci/cuda_build.sh)."""

import os
import types

import pytest

from fusedrnn import toolchain


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
