"""bench/calibrate.py on the CPU: its contract without a GPU, and that its fit recovers known constants from
measurements made to the model's own formulas. Its measurements themselves need a GPU (a gpu_check.sh stage)."""

import pytest
import torch

from bench import calibrate
from fusedrnn import planner
from fusedrnn.planner import CONSTANTS, KNOWN_DEVICES, plan

H100 = KNOWN_DEVICES["H100"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a CUDA device")
def test_refuses_without_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        calibrate.main(["--out-dir", str(tmp_path)])
    assert exit_info.value.code != 0
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _point(B, H, dtype, measured_ms, T=64):
    return {"kind": "point", "cell": "lstm", "T": T, "B": B, "I": H, "H": H, "dtype": dtype, "measured_ms": measured_ms}


def test_fit_recovers_the_constants_it_measures():
    T = 256
    launch, call, barrier, triton = 3.1, 7.3, 2.2, 4.4
    latency = CONSTANTS["step_latency_us"]
    tiny = _point(1, 32, "float32", {"per_step": T * launch / 1e3, "gemm": T * (launch + call) / 1e3,
                                     "persistent": T * (barrier + latency) / 1e3, "triton": T * triton / 1e3,
                                     "triton_split": T * 21.5 / 1e3}, T)
    # a persistent point whose FMA work runs at 42 % of the FP32 peak
    shape = planner.Shape.of("lstm", 64, 256, 256, 256, 256, 1, torch.float32)
    work_us = 2 * shape.macs / (H100.flops_per_us("fp32") * 0.42)
    big = _point(256, 256, "float32", {"persistent": 64 * (barrier + latency + work_us) / 1e3})
    small = _point(16, 256, "float32", {"persistent": 64 * (barrier + latency) / 1e3})
    l2 = {"gbps": 6123.4}
    gemm = {"efficiency": 0.71}
    got = calibrate.fit_constants(tiny, [small, big], l2, gemm, H100)
    want = {"launch_us": launch, "gemm_call_us": call, "grid_barrier_us": barrier, "triton_step_us": triton,
            "triton_launch_us": 21.5, "fma_efficiency": 0.42, "gemm_efficiency": 0.71, "l2_gbps": 6123.0}
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=0.011), name
    assert set(got) == set(CONSTANTS)  # the same keys: a drop-in replacement for planner.CONSTANTS
    assert got["step_latency_us"] == latency and got["clock_ghz"] == CONSTANTS["clock_ghz"]  # not measured


def test_grid_brackets_the_predicted_crossovers():
    grid = calibrate.crossover_grid(H100)
    for dtype_name in ("float32", "bfloat16"):
        for H in (256, 1024):
            batches = [B for _, _, B, _, h, dt in grid if (h, dt) == (H, dtype_name)]
            picks = {B: plan(planner.Shape.of("lstm", 64, B, H, H, H, 1, getattr(torch, dtype_name)), H100,
                             backends=("cuda",)).scheme for B in calibrate.SCAN_B}
            assert {1, 256} <= set(batches)
            for small, large in zip(calibrate.SCAN_B, calibrate.SCAN_B[1:]):
                if picks[small] != picks[large]:
                    assert {small, large} <= set(batches), (dtype_name, H, small, large)
    at_1024 = [B for _, _, B, _, H, dt in grid if (H, dt) == (1024, "bfloat16")]
    assert len(at_1024) > 2  # the model predicts a switch to gemm inside the scan there


def test_table_names_each_point_and_both_picks():
    point = {**_point(16, 256, "float32", {"persistent": 0.1, "per_step": 0.2, "gemm": 0.5}),
             "planner_pick": "persistent", "fastest": "persistent"}
    text = calibrate.table([point], {**CONSTANTS, "grid_barrier_us": 100.0}, H100)
    assert "persistent -> per_step" in text.splitlines()[1]
