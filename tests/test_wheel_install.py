"""A non-editable install builds the C++ extension on first use: a wheel built from this tree without compiled
extensions (FUSEDRNN_BUILD_CPP=0, FUSEDRNN_BUILD_CUDA=0) carries the C++ and CUDA sources as package data; installed
into a directory outside the source tree, imported from there with an empty torch extension cache, the cpp backend
compiles fusedrnn/csrc/cpu from the installed copy (fusedrnn/toolchain.py's sources and flags) and runs a layer
forward that matches the reference. Slow: one compile of the CPU sources (~1-2 min on 2 cores); it is also the
test of cpp.py's build on first use."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
from pathlib import Path

import torch

import fusedrnn
from fusedrnn import cpp, reference, toolchain
from fusedrnn.cells import LayerWeights

site = Path(sys.argv[1]).resolve()
assert Path(fusedrnn.__file__).resolve().is_relative_to(site), f"imported {fusedrnn.__file__}, not the install"
assert toolchain.CSRC.resolve().is_relative_to(site) and cpp.unavailable_reason("cpu", torch.float32, "gru") is None
module, _ = cpp._extension()
assert module.__name__ == toolchain.CPU.jit_name, f"not built on first use: {module.__file__}"
torch.manual_seed(0)
x, h0 = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
weights = LayerWeights(torch.randn(18, 5, dtype=torch.float64), torch.randn(18, 6, dtype=torch.float64))
got, want = cpp.forward("gru", x, h0, None, weights, None, False), reference.forward("gru", x, h0, None, weights, None, False)
torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
print("built and ran", module.__file__)
"""


def _run(cmd, **kwargs):
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1200, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_builds_the_cpp_extension_on_first_use(tmp_path):
    env = {**os.environ, "FUSEDRNN_BUILD_CPP": "0", "FUSEDRNN_BUILD_CUDA": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", tmp_path / "dist",
          ROOT], env=env, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("fusedrnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd"))], "the wheel carries a compiled extension"
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fusedrnn" / "csrc").rglob("*") if p.is_file()}
    assert sources and not sources - set(names), f"missing from the wheel: {sorted(sources - set(names))}"
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel], env=env)
    # python -S: no .pth files, so no editable install of this tree can answer for fusedrnn._cpp; torch and the
    # rest come from this interpreter's site-packages, named explicitly after the install.
    paths = [str(site), *dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))]
    env = {**env, "PYTHONPATH": os.pathsep.join(paths), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    done = _run([sys.executable, "-S", "-c", CHECK, site], env=env, cwd=tmp_path)
    assert "built and ran" in done.stdout
