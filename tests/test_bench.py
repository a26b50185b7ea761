"""bench/: the smoke preset runs end to end, failures stay visible, bad options fail in one line.

Timings are never asserted (speed lives in bench/results/); the timing utilities are checked on
their arithmetic and call order with fake workloads.
"""

import csv
import json
import types

import pytest
import torch

from bench import measure, run, timing
from bench.presets import Sweep


def run_cli(tmp_path, *options):
    """bench/run.py's main on the CPU with results in tmp_path: (exit code, rows, meta)."""
    code = run.main(["--device", "cpu", "--out-dir", str(tmp_path), "--quiet", *options])
    (json_path,) = tmp_path.glob("*.json")
    data = json.loads(json_path.read_text())
    return code, data["results"], data["meta"]


def test_smoke_preset_reports_every_point_and_backend(tmp_path, capsys):
    code, rows, meta = run_cli(tmp_path, "--preset", "smoke", "--strict")
    assert code == 0  # --strict: no backend errored (n/a is allowed)
    points = measure.sweep_points(run.PRESETS["smoke"].sweeps["cpu"], None)
    backends = ("torch.nn", *measure.FUSED_BACKENDS["cpu"])
    assert [(r["cell"], r["pass"], r["batch"], r["hidden"], r["backend"]) for r in rows] == [
        (p.cell, p.pass_, p.batch, p.hidden, b) for p in points for b in backends
    ]
    book = {(r["pass"], r["seq_len"], r["batch"], r["input_size"], r["hidden"], r["layers"]) for r in rows if r["tag"]}
    assert book == {(pass_, 35, 32, 28, 256, 2) for pass_ in ("inference", "train")}
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith("n/a: "), r["status"]
        if r["status"] == "ok":
            assert r["repeats"] >= 2 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
            assert r["max_diff"] < 1e-4  # same weights and inputs as torch.nn
    assert all(r["status"] == "ok" and r["speedup"] == 1.0 for r in rows if r["backend"] == "torch.nn")
    for key in ("device", "date", "torch", "triton", "python", "git_commit", "dtypes", "command"):
        assert meta[key], key
    with next(tmp_path.glob("*.csv")).open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and csv_rows[0]["device"] == meta["device"]
    assert next(tmp_path.glob("*.png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Reproduce: `python bench/run.py --device cpu" in next(tmp_path.glob("*.md")).read_text()
    table = capsys.readouterr().out
    assert "lstm*" in table and "speed-up" in table


def test_unavailable_backend_is_a_row_not_dropped(tmp_path):
    code, rows, _ = run_cli(
        tmp_path, "--preset", "smoke", "--cells", "rnn_tanh", "--passes", "inference", "--backends", "cuda", "--no-plot"
    )
    assert code == 0
    assert [r["backend"] for r in rows] == ["torch.nn", "cuda"] * 2  # the book's model, then the grid point
    assert all(r["status"].startswith("n/a: ") and r["median_ms"] is None for r in rows if r["backend"] == "cuda")
    assert not list(tmp_path.glob("*.png"))


def test_a_backend_that_did_not_run_is_an_error():
    module = types.SimpleNamespace(last_backend="reference")
    with pytest.raises(RuntimeError, match="asked for 'cpp' but 'reference' ran"):
        measure.ran_backend(module, "cpp")
    assert measure.ran_backend(module, "auto") == "reference"


def test_book_model_is_included_once():
    sweep = Sweep(("lstm", "gru"), batch=(32,), hidden=(256,), seq_len=(35,), layers=(2,), dtypes=("float32",),
                  passes=("train",))  # fmt: skip
    points = measure.sweep_points(sweep, input_size=28)
    assert [(p.cell, p.tag) for p in points] == [("lstm", "book"), ("gru", "")]


BAD_OPTIONS = [
    ["--batch", "0"],
    ["--hidden", "x"],
    ["--seq-len", ","],
    ["--cells", "lstm,lstmx"],
    ["--dtypes", "float8"],
    ["--passes", "eval"],
    ["--modes", "train"],  # the old name of --passes
    ["--backends", "cudnn"],
    ["--preset", "huge"],
    ["--device", "tpu"],
    ["--device", "nonsense"],
    ["--repeats", "-1"],
    ["--threads", "0"],
    ["--unknown"],
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append(["--device", "cuda"])


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=" ".join)
def test_bad_option_is_a_one_line_error(options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(options)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("bench/run.py: error: ")


def test_summarize_is_median_iqr_and_extremes():
    stats = timing.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert stats == timing.Stats(median_ms=3.0, q25_ms=2.0, q75_ms=4.0, min_ms=1.0, max_ms=5.0, repeats=5)
    assert timing.summarize([7.0]) == timing.Stats(7.0, 7.0, 7.0, 7.0, 7.0, 1)
    with pytest.raises(ValueError):
        timing.summarize([])


def test_repeats_fill_the_budget_within_bounds():
    schedule = timing.Schedule(warmup=1, min_repeats=5, max_repeats=50, budget_s=0.1)
    assert timing.repeats_for(10.0, schedule) == 10
    assert timing.repeats_for(1000.0, schedule) == 5
    assert timing.repeats_for(0.001, schedule) == 50


def test_time_interleaved_rotates_the_order_each_round():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    schedule = timing.Schedule(warmup=1, min_repeats=3, max_repeats=3, budget_s=0.0)
    stats = timing.time_interleaved(fns, torch.device("cpu"), schedule)
    warm_up, timed = calls[:3], calls[3:]
    assert warm_up == list("abc")
    assert timed == list("abc" "bca" "cab")
    assert {name: s.repeats for name, s in stats.items()} == {"a": 3, "b": 3, "c": 3}


def test_cpu_peak_memory_sees_a_large_temporary():
    size = 64 * 2**20
    peak = timing.peak_memory_bytes(lambda: torch.ones(size // 4).sum(), torch.device("cpu"))
    if peak is None:
        pytest.skip("no /proc/self/clear_refs on this platform")
    assert size * 0.9 <= peak <= size * 2


def test_stack_vs_layers_times_both_paths(tmp_path, monkeypatch):
    """bench/stack_vs_layers.py: every shape and pass gets the three candidates, and "layers" really runs
    the stack layer by layer (no stack op call), "stack" in one call."""
    from bench import candidates
    from bench import stack_vs_layers as svl
    from fusedrnn import ops

    assert svl.main(["--device", "cpu", "--backend", "reference", "--shapes", "tiny", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("stack_vs_layers_*.json")
    rows = json.loads(path.read_text())["results"]
    expected = [(s[0], pass_, c) for s in svl.SHAPES["tiny"] for pass_ in ("inference", "train")
                for c in ("stack", "layers", "torch.nn")]
    assert [(r["cell"], r["pass"], r["candidate"]) for r in rows] == expected
    calls = []
    original = ops.stack_forward
    monkeypatch.setattr(ops, "stack_forward", lambda *a: calls.append(1) or original(*a))
    models = svl.candidates("gru", 3, 4, 2, "reference", torch.device("cpu"))
    x = torch.randn(3, 2, 3)
    for name, expected_calls in (("layers", 0), ("stack", 1)):
        calls.clear()
        candidates.step(models[name], x, train=True)()
        assert len(calls) == expected_calls, name


KILLED_AFTER_TWO_POINTS = """
import os, signal, sys
from bench import measure, run
measure_point, seen = measure.measure_point, []
def measure_then_die(point, config):
    if len(seen) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as a time limit's kill would: no handler, no cleanup
    seen.append(point)
    return measure_point(point, config)
measure.measure_point = measure_then_die
run.main(sys.argv[1:])
"""


def test_rows_measured_before_a_kill_are_on_disk(tmp_path):
    """bench/run.py writes each point's rows as measured: killed at its third point, the CSV and the JSON hold
    the first two points' rows (the JSON marked incomplete)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(run.__file__).resolve().parents[1]
    args = ["--device", "cpu", "--preset", "smoke", "--out-dir", str(tmp_path), "--quiet", "--no-plot"]
    done = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO_POINTS, *args], cwd=root, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    (json_path,) = tmp_path.glob("*.json")
    data = json.loads(json_path.read_text())
    backends = 1 + len(measure.FUSED_BACKENDS["cpu"])
    assert data["complete"] is False and len(data["results"]) == 2 * backends
    assert data["meta"]["device"] and all(r["status"] for r in data["results"])
    with next(tmp_path.glob("*.csv")).open() as f:
        assert [r["backend"] for r in csv.DictReader(f)] == [r["backend"] for r in data["results"]]


def test_a_finished_run_is_marked_complete(tmp_path):
    run_cli(tmp_path, "--preset", "smoke", "--cells", "gru", "--passes", "inference", "--no-plot")
    (json_path,) = tmp_path.glob("*.json")
    assert json.loads(json_path.read_text())["complete"] is True
    assert not list(tmp_path.glob("*.partial"))


def test_gpu_lease_preset_is_the_trimmed_cuda_sweep(capsys):
    """The preset bench/gpu_check.sh runs: the book's model and 16 LSTM points, both fused GPU backends vs cuDNN
    (no reference), CUDA only (on the CPU a one-line error)."""
    preset = run.PRESETS["gpu-lease"]
    assert preset.backends == ("cuda", "triton") and set(preset.sweeps) == {"cuda"}
    points = measure.sweep_points(preset.sweeps["cuda"], None)
    assert len(points) == 20 and {p.dtype for p in points} == {"float32", "bfloat16"}
    assert sum(p.tag == "book" for p in points) == 4
    with pytest.raises(SystemExit):
        run.main(["--preset", "gpu-lease", "--device", "cpu"])
    assert "preset gpu-lease has no cpu sweep" in capsys.readouterr().err
