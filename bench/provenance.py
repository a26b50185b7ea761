"""What every bench/ result file records so its numbers can be read later: the machine, versions, commit, date."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def timer(device: torch.device) -> str:
    return "CUDA events after a synchronize" if device.type == "cuda" else "host perf_counter"


def provenance(device: torch.device) -> dict:
    """The fields every result file starts its metadata with; each script adds its own. FUSEDRNN_COMMIT names
    the commit where the checkout has no .git (bench/gpu_check.sh on the device machine)."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "fusedrnn": package_version("fusedrnn"),
        "platform": platform.platform(),
        "git_commit": os.environ.get("FUSEDRNN_COMMIT") or git("rev-parse", "HEAD") or "none (no commit yet)",
        "git_dirty": bool(git("status", "--porcelain")),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews the numbers
        "timer": timer(device),
    }
