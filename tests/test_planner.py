"""The planner's decisions (fusedrnn/planner.py) on synthetic devices, on the CPU: each follows from the cost model
written in bench/results/cuda_floor.md, and moves when a constant in planner.CONSTANTS moves. Whether the constants
are right is for bench/calibrate.py on a GPU; these tests pin the logic, not the numbers' truth."""

import pytest
import torch

from fusedrnn import cuda, planner
from fusedrnn.cells import LayerWeights
from fusedrnn.planner import CONSTANTS, KNOWN_DEVICES, Device, Shape, plan

H100, A100 = KNOWN_DEVICES["H100"], KNOWN_DEVICES["A100"]
BOOK = {"cell": "lstm", "T": 35, "B": 32, "I": 28, "H": 256, "P": 256}  # the book's model, per layer


def _shape(dtype=torch.float32, L=1, **kw):
    args = {**BOOK, **kw}
    return Shape.of(args["cell"], args["T"], args["B"], args["I"], args["H"], args["P"], L, dtype)


def test_book_model_runs_one_persistent_wavefront():
    chosen = plan(_shape(L=2), H100)
    assert (chosen.backend, chosen.scheme, chosen.by_layers) == ("cuda", "persistent", False)
    assert chosen.predicted["wavefront-persistent"] < chosen.predicted["persistent"]  # T + 1 barriers, not 2T


def test_book_model_on_an_a100_goes_layer_by_layer():
    """Half the FP32 rate per SM: a super-step doing both layers' W_hh and W_ih products on the SMs costs more
    than the barriers the wavefront saves."""
    chosen = plan(_shape(L=2), A100)
    assert (chosen.scheme, chosen.by_layers) == ("persistent", True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_large_batch_and_hidden_run_on_tensor_cores(dtype):
    """B=256, H=1024: the per-step product (1 GFLOP) is throughput-bound; FP32 FMA loops lose to cuBLAS."""
    chosen = plan(_shape(dtype, B=256, H=1024, P=1024, I=1024), H100)
    assert chosen.scheme == "gemm"
    assert chosen.predicted["gemm"] < chosen.predicted["persistent"] / 2


def test_float32_gemm_follows_torchs_tf32_setting():
    """ATen's GEMMs run TF32 only when torch.backends.cuda.matmul.allow_tf32 is set; the model reads it."""
    shape = {"B": 64, "H": 1024, "P": 1024, "I": 1024}
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        strict = plan(_shape(**shape), H100)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = plan(_shape(**shape), H100)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert tf32.predicted["gemm"] < strict.predicted["gemm"]
    assert tf32.predicted["persistent"] == strict.predicted["persistent"]


@pytest.mark.parametrize("B,H", [(1, 128), (8, 256), (32, 128)])
def test_small_latency_bound_shapes_run_persistent(B, H):
    chosen = plan(_shape(B=B, H=H, P=H), H100)
    assert chosen.scheme == "persistent"


def test_persistent_needs_the_weights_on_chip():
    """When the exact occupancy query says no, persistent is not a candidate, whatever its predicted time."""
    chosen = plan(_shape(B=1, H=128, P=128, L=2), H100, fits=lambda layers: False)
    assert "persistent" not in chosen.predicted and "wavefront-persistent" not in chosen.predicted
    assert chosen.scheme in ("per_step", "gemm")


def test_stack_goes_layer_by_layer_when_only_one_layer_fits():
    """H=1024 float32: one layer's W_hh (16 MiB) fits in 132 x 227 KiB, two layers' W_hh and W_ih do not; the
    per-step wavefront would stream 2 x 16 MiB from L2 every super-step, more than 2T grid barriers cost."""
    shape = _shape(B=8, H=1024, P=1024, I=1024, L=2)
    assert planner.fits_on_chip(shape, H100, 1) and not planner.fits_on_chip(shape, H100, 2)
    chosen = plan(shape, H100)
    assert (chosen.scheme, chosen.by_layers) == ("persistent", True)


def test_decisions_follow_the_constants(monkeypatch):
    """The crossover moves with the constants calibrate.py measures: a cheaper GEMM call wins earlier."""
    shape = _shape(torch.bfloat16, B=32, H=512, P=512, I=512)
    assert plan(shape, H100).scheme == "persistent"
    monkeypatch.setitem(CONSTANTS, "gemm_call_us", 0.5)
    monkeypatch.setitem(CONSTANTS, "launch_us", 0.5)
    assert plan(shape, H100).scheme == "gemm"


def test_cuda_or_triton():
    """The backend choice compares Triton's model too, and keeps to the backends available."""
    shape = _shape(B=4, H=64, P=64)
    assert plan(shape, H100).backend == "cuda"
    assert plan(shape, H100, backends=("triton",)).backend == "triton"
    cheap = {**CONSTANTS, "triton_step_us": 0.0, "grid_barrier_us": 50.0, "launch_us": 50.0, "gemm_call_us": 50.0}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(planner, "CONSTANTS", cheap)
        assert plan(shape, H100).backend == "triton"


def test_projection_costs_a_second_phase():
    plain, proj = _shape(B=8, H=256, P=256), _shape(B=8, H=256, P=128)
    for scheme in planner.SCHEMES:
        assert planner.step_us(scheme, proj, H100) > planner.step_us(scheme, plain, H100) * 1.2


def test_cpu_device_is_the_host_emulation():
    emu = Device.of("cpu")
    assert (emu.sms, emu.smem_per_block) == (4, 48 * 1024)


def test_forced_scheme_wins_over_the_planner(monkeypatch):
    """FUSEDRNN_CUDA_SCHEME (cuda.SCHEME) still forces one; gemm runs a stack layer by layer."""

    class Ext:
        max_layers = 8

    monkeypatch.setattr(cuda, "_ext", lambda: Ext)
    x, weights = torch.empty(35, 32, 28), LayerWeights(torch.empty(1024, 28), torch.empty(1024, 256))
    for scheme in ("persistent", "per_step", "gemm"):
        monkeypatch.setattr(cuda, "SCHEME", scheme)
        chosen = cuda._plan("lstm", x, weights, 2, backward=False)
        assert (chosen.scheme, chosen.by_layers) == (scheme, scheme == "gemm")


def test_triton_splits_the_units_at_small_batch():
    """B <= 16 leaves the persistent Triton kernel one program, streaming all of W_hh each step on one SM; the split
    variant spreads W_hh over H / 32 programs. At B=256 there are programs enough already."""
    wide = _shape(B=1, H=1024, P=1024, I=1024)
    assert planner.step_us("triton_split", wide, H100) < planner.step_us("triton", wide, H100) / 5
    assert plan(wide, H100, backends=("triton",)).scheme == "split"
    busy = _shape(torch.bfloat16, B=256, H=128, P=128)
    assert plan(busy, H100, backends=("triton",)).scheme == "persistent"


def test_triton_variant_is_forced_or_planned(monkeypatch):
    from fusedrnn.triton import common

    x = torch.empty(5, 1, 1024)
    for forced, want in (("split", True), ("persistent", False)):
        monkeypatch.setattr(common, "VARIANT", forced)
        assert common.split(x, 1024, 1024, "lstm") is want
    monkeypatch.setattr(common, "VARIANT", "auto")  # on the CPU: the planner on the host emulation's device
    shape = Shape.of("lstm", 5, 1, 1024, 1024, 1024, 1, torch.float32)
    emu = Device.of("cpu")
    assert common.split(x, 1024, 1024, "lstm") is (
        planner.step_us("triton_split", shape, emu) < planner.step_us("triton", shape, emu))
    monkeypatch.setattr(common, "VARIANT", "sideways")
    with pytest.raises(ValueError, match="FUSEDRNN_TRITON_VARIANT"):
        common.split(x, 1024, 1024, "lstm")


class _Ext:
    max_layers = 8


@pytest.fixture
def planned_on_h100(monkeypatch):
    """cuda.planned_backend on a synthetic H100 where every stack fits on chip (no extension, no GPU)."""
    monkeypatch.setattr(cuda, "_ext", lambda: _Ext)
    monkeypatch.setattr(cuda, "_fits_on_chip", lambda *args, **kwargs: True)
    monkeypatch.setattr(planner.Device, "of", staticmethod(lambda device: H100))
    cuda._planned_backend.cache_clear()
    yield lambda x, H=256, P=256, layers=2: cuda.planned_backend("lstm", x, torch.float32, H, P, layers)
    cuda._planned_backend.cache_clear()


def test_auto_between_gpu_backends_follows_the_planner(planned_on_h100, monkeypatch):
    """What `auto` runs on CUDA (modules -> backend.planned_on_gpu -> cuda.planned_backend) is planner.plan's
    backend for the call's shape: CUDA with today's constants, Triton where the constants make it cheaper."""
    x = torch.empty(35, 32, 28)
    assert planned_on_h100(x) == plan(_shape(L=2), H100).backend == "cuda"
    cheap = {**CONSTANTS, "triton_step_us": 0.0, "grid_barrier_us": 50.0, "launch_us": 50.0, "gemm_call_us": 50.0}
    monkeypatch.setattr(planner, "CONSTANTS", cheap)
    cuda._planned_backend.cache_clear()
    assert planned_on_h100(x) == plan(_shape(L=2), H100).backend == "triton"


def test_a_backend_asked_for_by_name_is_not_replanned(monkeypatch):
    """backend="cuda" (or FUSEDRNN_BACKEND=cuda) runs CUDA whatever the planner prefers; only auto is planned."""
    from fusedrnn import backend as backends

    def refuse(*args):
        raise AssertionError("the planner was asked about a backend chosen by name")

    monkeypatch.setattr(cuda, "planned_backend", refuse)
    x = torch.empty(35, 32, 28)
    assert backends.planned_on_gpu("cuda", "lstm", x, torch.float32, 256, 0, 2) == "cuda"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    assert backends.planned_on_gpu("auto", "lstm", x, torch.float32, 256, 0, 2) == "cuda"
