"""Which way a recurrence runs on a GPU: the CUDA backend's scheme, and CUDA or Triton, from a cost model.

The model, its derivation and its predictions for the benchmark's corner points are in
bench/results/cuda_floor.md; every constant it uses is in ``CONSTANTS`` below, nowhere else. They are ESTIMATES
(datasheet rates, typical launch and barrier latencies) until ``bench/calibrate.py`` has measured them on a GPU
and printed the values to put back here.

What each scheme costs per dependent step (microseconds), for one layer-direction with B batch rows, H units,
P outputs, G gates; the recurrent product is m = B * G*H * P multiply-adds (plus B * P * H with proj_size):
  persistent  grid barrier + step latency + 2m / (FP32 FMA rate of the SMs used x fma_efficiency)
              (W_hh stays in shared memory; with proj_size a second barrier per step)
  per_step    one launch per phase + max(W_hh bytes / cache bandwidth, the same FMA time on all SMs)
  gemm        max(host: ATen GEMM calls + pointwise launches, device: 2m / tensor-core rate x gemm_efficiency
              (scaled by how many 64 x 128 output tiles the SMs get) + W_hh bytes / cache bandwidth)
  triton      triton_step_us + W_hh bytes / one SM's cache bandwidth (each program of 16 batch rows streams all
              of W_hh every step) + its share of the product on one SM's tensor cores
  triton_split  one Triton launch per phase + max(W_hh bytes per batch tile / the cache bandwidth of the SMs
              its (batch tile x 32 units) programs occupy, the product on those SMs' tensor cores)
A stack of L layers runs T + L - 1 super-steps as one wavefront (persistent or per_step, every layer's W_hh and
W_ih slices on chip at once) or L * T steps layer by layer; the backward costs about twice the forward in every
scheme, and the weight-gradient GEMMs after it are the same in all of them, so the forward's steps decide.
"""

import dataclasses
import functools
import math

import torch

from .cells import gates

# ---- the one place for the model's constants (estimates until bench/calibrate.py measures them) ----------------
CONSTANTS = {
    "launch_us": 2.5,  # host cost of one kernel launch issued back to back on a stream
    "gemm_call_us": 6.0,  # host cost of one small ATen mm (dispatch, cuBLAS heuristic, launch)
    "grid_barrier_us": 1.5,  # one cooperative grid.sync() across every SM
    "step_latency_us": 1.0,  # a persistent step's own latency: h through L2, block barriers
    "triton_step_us": 2.0,  # a Triton program's step: h through global memory, a block barrier
    "triton_launch_us": 20.0,  # a split-variant launch from Python (less where its CUDA graph replays)
    "fma_efficiency": 0.35,  # share of the FP32 FMA peak block_matvec reaches (shuffles, shared-memory loads)
    "gemm_efficiency": 0.6,  # share of the tensor-core peak a cuBLAS GEMM with enough tiles reaches
    "l2_gbps": 5500.0,  # L2 read bandwidth of the whole chip
    "clock_ghz": 1.7,  # SM clock under load
}

# Peak FLOP per clock per SM by compute-capability major (dense; NVIDIA's A100 and H100 datasheets).
_FLOP_PER_CLOCK_SM = {
    8: {"fp32": 128, "tf32": 1024, "half": 2048},
    9: {"fp32": 256, "tf32": 2048, "half": 4096},
}
_HBM_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # by name; unknown cards get the lowest
SCHEMES = ("persistent", "per_step", "gemm")
TRITON_VARIANTS = {"triton": "persistent", "triton_split": "split"}  # candidate -> fusedrnn.triton variant


@dataclasses.dataclass(frozen=True)
class Device:
    """What the model needs to know about a GPU. ``from_torch`` reads it off a CUDA device."""

    name: str
    major: int  # compute capability
    sms: int
    smem_per_block: int  # bytes of shared memory a block can opt in to
    l2_bytes: int
    hbm_gbps: float

    def flops_per_us(self, unit):
        """Peak FLOP per microsecond of the chip's `unit` ("fp32", "tf32", "half")."""
        per_sm = _FLOP_PER_CLOCK_SM.get(self.major, _FLOP_PER_CLOCK_SM[8])[unit]
        return per_sm * self.sms * CONSTANTS["clock_ghz"] * 1e3

    @staticmethod
    @functools.cache
    def of(device):
        """The properties of a CUDA device; for a CPU device, the host emulation's small device that the CUDA
        backend's tests run on (csrc/host_emulation.h: 4 SMs, 48 KiB of shared memory per block)."""
        device = torch.device(device)
        if device.type != "cuda":
            return Device("host emulation", 9, 4, 48 * 1024, 50 * 2**20, min(_HBM_GBPS.values()))
        p = torch.cuda.get_device_properties(device)
        hbm = next((v for k, v in _HBM_GBPS.items() if k in p.name), min(_HBM_GBPS.values()))
        return Device(p.name, p.major, p.multi_processor_count, p.shared_memory_per_block_optin, p.L2_cache_size, hbm)


# Datasheet devices (SXM parts) for predictions without a GPU: bench/calibrate.py --predict, the unit tests.
KNOWN_DEVICES = {
    "H100": Device("NVIDIA H100 80GB HBM3", 9, 132, 227 * 1024, 50 * 2**20, _HBM_GBPS["H100"]),
    "H200": Device("NVIDIA H200", 9, 132, 227 * 1024, 50 * 2**20, _HBM_GBPS["H200"]),
    "A100": Device("NVIDIA A100-SXM4-80GB", 8, 108, 163 * 1024, 40 * 2**20, _HBM_GBPS["A100"]),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One call: cell, T steps, B batch rows, I inputs, H units, P outputs (H without proj_size), L layers of a
    unidirectional stack (1: one layer-direction), element size in bytes, and whether float32 products may use
    TF32 (torch.backends.cuda.matmul.allow_tf32, which ATen's GEMMs follow)."""

    cell: str
    T: int
    B: int
    I: int
    H: int
    P: int
    L: int = 1
    elem: int = 4
    tf32: bool = False

    @property
    def macs(self):
        """Multiply-adds of one step's recurrent product (and projection)."""
        return self.B * gates(self.cell) * self.H * self.P + (self.B * self.P * self.H if self.P != self.H else 0)

    @property
    def weight_bytes(self):
        """Bytes of one layer's recurrent weights (W_hh, W_hr)."""
        return (gates(self.cell) * self.H * self.P + (self.P * self.H if self.P != self.H else 0)) * self.elem

    @staticmethod
    def of(cell, T, B, I, H, P, L, dtype, allow_tf32=None):
        """The shape of a call in `dtype`; allow_tf32: torch's setting (default: read it now)."""
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32
        return Shape(cell, T, B, I, H, P, L, dtype.itemsize, dtype == torch.float32 and allow_tf32)


def fits_on_chip(shape, device, layers):
    """Whether `layers` layers' recurrent weight slices (and, for a stack, W_ih's) fit in the shared memory of
    every SM with one block each, less a batch tile of float32 gate sums: the model's estimate of the CUDA
    launcher's exact occupancy query (csrc/recurrence.cuh make_plan), which fusedrnn.cuda asks as well."""
    blocks = device.sms // layers
    if blocks == 0:
        return False
    per_block = math.ceil(gates(shape.cell) * shape.H / blocks) * shape.P * shape.elem * (2 if layers > 1 else 1)
    per_block += math.ceil(shape.P / blocks) * shape.H * shape.elem if shape.P != shape.H else 0
    acc = 4 * 32 * gates(shape.cell) * math.ceil(shape.H / blocks) * (2 if layers > 1 else 1)
    return per_block + acc <= device.smem_per_block


def _cache_gbps(shape, device, layers=1):
    return CONSTANTS["l2_gbps"] if layers * shape.weight_bytes <= device.l2_bytes else device.hbm_gbps


def _fma_us(flops, device, sms):
    per_sm = device.flops_per_us("fp32") / device.sms
    return flops / (per_sm * sms * CONSTANTS["fma_efficiency"])


def step_us(scheme, shape, device, layers=1):
    """Predicted microseconds of one dependent step of `scheme` running `layers` layers at once (a wavefront
    super-step; 1: one layer-direction)."""
    c = CONSTANTS
    proj = shape.P != shape.H
    flops = 2 * shape.macs * layers * (2 if layers > 1 else 1)  # a wavefront also projects W_ih on chip
    unit = "half" if shape.elem == 2 else "tf32" if shape.tf32 else "fp32"  # the tensor cores' input type
    if scheme == "persistent":
        return (1 + proj) * (c["grid_barrier_us"] + c["step_latency_us"]) + _fma_us(flops, device, device.sms)
    if scheme == "per_step":
        memory = layers * shape.weight_bytes / (_cache_gbps(shape, device, layers) * 1e3)
        return (1 + proj) * c["launch_us"] + max(memory, _fma_us(flops, device, device.sms))
    if scheme == "gemm":
        tiles = math.ceil(shape.B / 64) * math.ceil(gates(shape.cell) * shape.H / 128)
        rate = device.flops_per_us(unit) * c["gemm_efficiency"] * min(1.0, tiles / device.sms)
        device_us = flops / rate + shape.weight_bytes / (_cache_gbps(shape, device) * 1e3)
        return max((1 + proj) * (c["gemm_call_us"] + c["launch_us"]), device_us)
    if scheme == "triton":
        one_sm_gbps = c["l2_gbps"] / device.sms
        tile_flops = 2 * min(shape.B, 16) * shape.macs / max(shape.B, 1)
        one_sm_rate = device.flops_per_us(unit) / device.sms
        return c["triton_step_us"] + shape.weight_bytes / (one_sm_gbps * 1e3) + tile_flops / one_sm_rate
    if scheme == "triton_split":
        tiles = math.ceil(shape.B / 16)
        share = min(1.0, tiles * math.ceil(shape.H / 32) / device.sms)  # of the chip its programs occupy
        memory = tiles * shape.weight_bytes / (c["l2_gbps"] * share * 1e3)
        compute = 2 * tiles * 16 * shape.macs / max(shape.B, 1) / (device.flops_per_us(unit) * share)
        return (1 + proj) * c["triton_launch_us"] + max(memory, compute)
    raise ValueError(f"unknown scheme {scheme!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The choice for one call: backend ("cuda" or "triton"), the CUDA scheme (or the Triton variant), whether a
    stack runs layer by layer, and the predicted forward microseconds of every candidate considered ({name: us})."""

    backend: str
    scheme: str
    by_layers: bool
    predicted: dict


def candidates(shape, device, fits=None):
    """{candidate: predicted forward microseconds} for every way this call can run. Candidates are "persistent",
    "per_step", "gemm" (layer by layer), "triton" and "triton_split", and for stacks "wavefront-persistent" and
    "wavefront-per_step". fits(layers) -> bool says whether `layers` layers run persistent; default: the
    model's estimate (fits_on_chip)."""
    fits = fits or (lambda layers: fits_on_chip(shape, device, layers))
    T, L = shape.T, shape.L
    out = {}
    if fits(1):
        out["persistent"] = L * T * step_us("persistent", shape, device)
    out["per_step"] = L * T * step_us("per_step", shape, device)
    out["gemm"] = L * T * step_us("gemm", shape, device)
    for candidate in TRITON_VARIANTS:
        out[candidate] = L * T * step_us(candidate, shape, device)
    if L > 1:
        if fits(L):
            out["wavefront-persistent"] = (T + L - 1) * step_us("persistent", shape, device, L)
        out["wavefront-per_step"] = (T + L - 1) * step_us("per_step", shape, device, L)
    return out


def plan(shape, device, fits=None, backends=("cuda", "triton")):
    """The fastest predicted way to run `shape` on `device` among the backends available."""
    predicted = candidates(shape, device, fits)
    usable = {k: v for k, v in predicted.items() if ("triton" if k in TRITON_VARIANTS else "cuda") in backends}
    best = min(usable, key=usable.get)
    if best in TRITON_VARIANTS:
        return Plan("triton", TRITON_VARIANTS[best], True, predicted)
    scheme = best.removeprefix("wavefront-")
    return Plan("cuda", scheme, shape.L > 1 and not best.startswith("wavefront-"), predicted)
