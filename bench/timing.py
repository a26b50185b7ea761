"""Shared timing and memory utilities for bench/.

Timing interleaves the candidates: every round calls each of them once, in an order rotated by one
per round, so drift (thermal, frequency, other processes) spreads over all of them instead of
penalising whichever ran last. Each call is timed on its own and the samples are reduced to a
median and spread (IQR, min, max).

- CPU: a host monotonic clock around the call; CPU work is synchronous.
- CUDA: CUDA events recorded around the call, after a device synchronize, so the span starts
  on an idle GPU and includes the host's launch latency (what a latency-bound RNN step really
  pays); the host clock never times asynchronous work. Nothing CUDA is touched at import: events
  and synchronizes happen only when a CUDA device is passed in.

Peak memory of one call:
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was
  allocated before the call (tensors the call allocates, not the caching allocator's reserve).
- CPU (Linux): peak resident set size during the call minus resident size before it. Writing
  "5" to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), and malloc_trim(0)
  first hands freed heap pages back to the OS so that re-used allocations fault in again and
  are counted. tracemalloc does not see torch's C++ allocations, and ru_maxrss cannot be reset.
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Stats:
    """Summary of per-call samples, in milliseconds."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    min_ms: float
    max_ms: float
    repeats: int


@dataclass(frozen=True)
class Schedule:
    """How much to run: warm-up rounds, then enough rounds to fill budget_s, clamped to [min, max]."""

    warmup: int
    min_repeats: int
    max_repeats: int
    budget_s: float


def summarize(samples_ms: list[float]) -> Stats:
    """Median, interquartile range and extremes of samples_ms (at least one sample)."""
    if not samples_ms:
        raise ValueError("summarize needs at least one sample")
    if len(samples_ms) == 1:
        q25 = q75 = samples_ms[0]
    else:
        q25, _, q75 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return Stats(
        median_ms=statistics.median(samples_ms),
        q25_ms=q25,
        q75_ms=q75,
        min_ms=min(samples_ms),
        max_ms=max(samples_ms),
        repeats=len(samples_ms),
    )


def rotated(names: list[str], round_index: int) -> list[str]:
    """names rotated left by round_index, so each name leads equally often."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def repeats_for(estimate_ms: float, schedule: Schedule) -> int:
    """Rounds that fit schedule.budget_s when one round costs estimate_ms."""
    wanted = math.ceil(schedule.budget_s * 1e3 / max(estimate_ms, 1e-6))
    return max(schedule.min_repeats, min(schedule.max_repeats, wanted))


class HostClock:
    """Times a synchronous call with a host clock in ns: the monotonic wall clock, or another such as
    time.thread_time_ns (the calling thread's CPU time: on a shared, overloaded machine it counts only the work,
    not the time the process was descheduled)."""

    def __init__(self, now_ns: Callable[[], int] = time.perf_counter_ns):
        self.now_ns = now_ns

    def start(self) -> int:
        return self.now_ns()

    def stop(self, started: int) -> Callable[[], float]:
        elapsed_ms = (self.now_ns() - started) / 1e6
        return lambda: elapsed_ms

    def settle(self) -> None:
        """Nothing is pending on the CPU."""


class CudaClock:
    """Times a call with CUDA events; samples resolve after settle() synchronizes."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> torch.cuda.Event:
        torch.cuda.synchronize(self.device)  # idle GPU: the span includes launch latency
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def stop(self, started: torch.cuda.Event) -> Callable[[], float]:
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        return lambda: started.elapsed_time(end)

    def settle(self) -> None:
        torch.cuda.synchronize(self.device)


def clock_for(device: torch.device) -> HostClock | CudaClock:
    if device.type == "cuda":
        return CudaClock(device)
    if device.type == "cpu":
        return HostClock()
    raise ValueError(f"no clock for device type {device.type!r}")


def _run_rounds(fns: Mapping[str, Callable[[], object]], rounds: int, clock) -> dict[str, list[float]]:
    """Call every fn once per round in rotated order; per-call times in ms."""
    names = list(fns)
    pending: dict[str, list[Callable[[], float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in rotated(names, r):
            started = clock.start()
            fns[name]()
            pending[name].append(clock.stop(started))
    clock.settle()
    return {name: [sample() for sample in samples] for name, samples in pending.items()}


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], device: torch.device, schedule: Schedule, clock=None
) -> dict[str, Stats]:
    """Warm up, then time every fn in fns over the same interleaved rounds, with clock (default: the device's).

    The number of timed rounds comes from the last warm-up round (the first ones may compile or
    allocate caches): enough to spend schedule.budget_s, within [min_repeats, max_repeats].
    """
    if not fns:
        return {}
    clock = clock or clock_for(device)
    warm = _run_rounds(fns, max(schedule.warmup, 1), clock)
    estimate_ms = sum(samples[-1] for samples in warm.values())
    timed = _run_rounds(fns, repeats_for(estimate_ms, schedule), clock)
    return {name: summarize(samples) for name, samples in timed.items()}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Extra memory at the peak of one call of fn; None where the platform cannot tell."""
    if device.type == "cuda":
        return _cuda_peak_delta(fn, device)
    return _rss_peak_delta(fn)


def _cuda_peak_delta(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise KeyError(key)


def _trim_heap() -> None:
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def _rss_peak_delta(fn: Callable[[], object]) -> int | None:
    gc.collect()
    _trim_heap()
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
        before = _status_bytes("VmRSS")
    except (OSError, KeyError):
        return None
    fn()
    return max(_status_bytes("VmHWM") - before, 0)
