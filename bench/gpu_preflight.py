"""bench/gpu_check.py's first stage (seconds): what this machine has for the GPU run, what is missing, and how
to bring it. Prints a report and writes it as JSON (the summary's card and versions).

    python bench/gpu_preflight.py OUT.json

The GPU machine has no network: a missing Python package travels as a wheel in the repository's ignored .whl/
folder (carried with the run) and gpu_check installs it with pip --no-index before this stage.
"""

import importlib.metadata
import json
import platform
import shutil
import sys

PACKAGES = ("torch", "triton", "numpy", "pytest", "hypothesis", "tqdm", "matplotlib", "setuptools", "wheel",
            "ninja")  # what the build, the tests and the benchmarks import
TOOLS = ("nvcc", "ninja", "c++", "compute-sanitizer", "nvidia-smi", "git")
HOW = ("on a machine with the registry: pip download --no-deps --python-version 3.12 --only-binary=:all: "
       "-d .whl NAME==VERSION, then carry .whl/ with the run (gpu_check installs it with --no-index)")


def main(out):
    info = {"python": platform.python_version(), "packages": {}, "tools": {}, "missing": []}
    for name in PACKAGES:
        try:
            info["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info["missing"].append(name)
    for tool in TOOLS:
        info["tools"][tool] = shutil.which(tool)
        if info["tools"][tool] is None and tool != "git":
            info["missing"].append(tool)
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(card=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                        memory_gib=round(p.total_memory / 2**30, 1))
        else:
            info["missing"].append("a CUDA device visible to torch")
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - reported, not raised: the other stages still run and say more
        info["import_error"] = f"{type(e).__name__}: {e}"
    with open(out, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps({k: v for k, v in info.items() if k != "packages"}, indent=1))
    print("packages:", ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    if info["missing"]:
        print(f"MISSING: {', '.join(info['missing'])}\nto bring a Python package: {HOW}")
    return 1 if info["missing"] or "import_error" in info else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
