"""The CUDA backend's sources under the real compiler, on a machine without a GPU (CI runs it): every kernel file of
fusedrnn/csrc/cuda builds with the local nvcc, with fusedrnn/toolchain.py's flags, for sm_80 and sm_90, and ptxas's
report shows every kernel with no spills and no stack frame (a register array demoted to local memory is a silent
slowdown in the hot loop). Skipped without nvcc. The same kernels run on the CPU: tests/test_cuda_emulation.py."""

import re
import shutil
import subprocess

import pytest

from fusedrnn import toolchain

NVCC = shutil.which("nvcc")
KERNEL_FILES = sorted((toolchain.CSRC / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
KERNELS_PER_FILE = {"lstm_cell.cu": 18, "gru_cell.cu": 18, "rnn_cell.cu": 36}  # fwd/bwd x 3 dtypes x 3 kinds
PROPERTIES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(text):
    """{(kernel, arch): (stack_bytes, spill_stores, spill_loads, registers)} from `nvcc -Xptxas -v` output."""
    report, current = {}, None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line):
            current = m.groups()
        elif current and (m := PROPERTIES.search(line)):
            report[current] = tuple(int(g) for g in m.groups())
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            report[current] = (*report[current], int(m.group(1)))
            current = None
    return report


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{file name: (nvcc return code, its output)}: each file built once for every arch, archs in parallel."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("nvcc")
    results = {}
    for source in KERNEL_FILES:
        archs = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
        cmd = [NVCC, "-c", *toolchain.CUDA.nvcc_flags, *archs, "--threads", "0", "-Xptxas", "-v", str(source)]
        done = subprocess.run([*cmd, "-o", str(out / "k.o")], check=False, capture_output=True, text=True, timeout=600)
        results[source.name] = (done.returncode, f"{' '.join(cmd)}\n{done.stdout}{done.stderr}")
    return results


def test_every_kernel_file_is_known():
    assert sorted(p.name for p in KERNEL_FILES) == sorted(KERNELS_PER_FILE)


def test_the_extension_builds_every_kernel_file():
    """The build config compiles exactly these kernel files and the binding (nothing from testing/)."""
    sources = toolchain.CUDA.sources(toolchain.CSRC)
    assert sources == sorted([*(f"cuda/{p.name}" for p in KERNEL_FILES), "cuda/binding.cpp"])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", KERNEL_FILES, ids=lambda p: p.name)
def test_compiles_without_spills(compiled, source, arch):
    returncode, output = compiled[source.name]
    assert returncode == 0, output[-4000:]
    kernels = {k: v for (k, a), v in _ptxas_report(output).items() if a == arch and "_kernel" in k}
    assert len(kernels) == KERNELS_PER_FILE[source.name], output[-4000:]
    for name, (stack, stores, loads, regs) in kernels.items():
        assert (stack, stores, loads) == (0, 0, 0), f"{name} on {arch}: stack {stack} B, spills {stores}/{loads} B"
        assert regs <= 255, f"{name} on {arch}: {regs} registers"
