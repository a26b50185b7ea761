"""bench/gpu_check.py's mechanics on the CPU, with stand-in stages: limits stop a stage with SIGINT (pytest still
writes its junit report) and SIGKILL after the grace, a stage cut off still names what ran, prerequisites block,
groups run side by side, the summary is written after every stage (so a runner killed mid-run leaves one), and
the real plan fits the lease and runs every gpu-marked test exactly once."""

import json
import signal
import subprocess
import sys
import time

import pytest

from bench import gpu_check

PY = sys.executable
PYTEST_FILE = """
import time

def test_passes():
    pass

def test_fails():
    assert 1 == 2

def test_hangs():
    time.sleep(120)
"""


def _stage(name, code, limit_s=30, **kwargs):
    return gpu_check.Stage(name, limit_s, [PY, "-c", code], "a stand-in", **kwargs)



@pytest.fixture(autouse=True)
def sigint_ignored_like_a_background_job():
    """Run every test here as a runner started with `cmd &` from a script is: SIGINT ignored (inherited by its
    children across exec unless run_plan undoes it). CI caught this: the junit of a stage cut at its limit was lost."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, before)


def test_stages_leave_readable_results(tmp_path):
    tests = tmp_path / "test_standin.py"
    tests.write_text(PYTEST_FILE)
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('stuck', flush=True); " \
               "time.sleep(60)"
    together = "import time; print(time.time(), flush=True); time.sleep(3)"
    stages = [
        _stage("ok", "print('hello')"),
        _stage("fails", "import sys; print('bad input'); sys.exit(3)"),
        _stage("blocked", "print('never')", needs=("fails",)),
        _stage("skipped", "print('never')", skip="nothing to do here"),
        # --rootdir: the junit names are relative to pytest's rootdir, which pytest otherwise derives from the
        # test file and this checkout's place (a clone under /tmp shares /tmp with tmp_path; /work/... does not).
        gpu_check.Stage("pytest_cut", 15, [PY, *gpu_check.PYTEST, f"--rootdir={tmp_path}", str(tests)], "a stand-in",
                        junit=True),
        _stage("stubborn", stubborn, limit_s=2),
        _stage("left", together, group="g"),
        _stage("right", together, group="g"),
    ]
    summaries = []
    prefix = tmp_path / "gpu_check_x"
    start = time.monotonic()
    results = {r.stage: r for r in gpu_check.run_plan(stages, prefix, on_result=summaries.append)}
    assert time.monotonic() - start < 15 + 2 + 3 + 2 * gpu_check.GRACE_S + 20  # the limits, not the sleeps
    assert [len(s) for s in summaries] == list(range(1, len(stages) + 1))  # one call per finished stage

    assert results["ok"].status == "ok" and results["ok"].last_line == "hello"
    assert results["fails"].status == "FAIL(rc=3)" and results["fails"].last_line == "bad input"
    assert results["blocked"].status == "blocked: needs fails"
    assert results["skipped"].status == "skipped: nothing to do here"

    cut = results["pytest_cut"]  # SIGINT at the limit: pytest stops the hanging test and still reports
    assert cut.status == "timeout(15s)" and cut.tests["source"] == "junit"
    assert (cut.tests["passed"], cut.tests["failures"]) == (1, 1)
    assert cut.failed == ["test_standin::test_fails"]
    assert "test_passes PASSED" in (tmp_path / cut.log).read_text()

    stuck = results["stubborn"]  # ignores SIGINT: killed GRACE_S later, its output kept
    assert stuck.status == "timeout(2s)" and stuck.last_line == "stuck"
    assert stuck.seconds < 2 + gpu_check.GRACE_S + 2

    starts = [float((tmp_path / results[n].log).read_text().splitlines()[1]) for n in ("left", "right")]
    assert abs(starts[0] - starts[1]) < 2.5  # side by side; one after the other they would be >= 3 s apart

    table = gpu_check.write_summary(prefix, {"card": "stand-in"}, list(results.values()))
    data = json.loads((tmp_path / "gpu_check_x.json").read_text())
    assert [s["stage"] for s in data["stages"]] == [s.name for s in stages]
    assert data["failed_tests"] == ["pytest_cut: test_standin::test_fails"]
    assert "| pytest_cut | timeout(15s) |" in table and (tmp_path / "gpu_check_x.md").read_text() == table


def test_counts_come_from_the_log_when_there_is_no_junit_report(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("tests/a.py::test_one PASSED [ 50%]\ntests/a.py::test_two[x-1] FAILED [100%]\n")
    counts, failed = gpu_check.test_counts(tmp_path / "missing.xml", log)
    assert counts["source"].startswith("log") and (counts["tests"], counts["passed"], counts["failures"]) == (2, 1, 1)
    assert failed == ["tests/a.py::test_two[x-1]"]


RUNNER = """
import sys
from pathlib import Path
from bench import gpu_check
prefix = Path(sys.argv[1])
stages = [gpu_check.Stage("first", 30, [sys.executable, "-c", "print('done')"], "a stand-in"),
          gpu_check.Stage("second", 30, [sys.executable, "-c", "import time; time.sleep(8)"], "a stand-in")]
gpu_check.run_plan(stages, prefix, on_result=lambda results: gpu_check.write_summary(prefix, {}, results))
"""


def test_a_runner_killed_mid_run_leaves_its_summary(tmp_path):
    prefix = tmp_path / "gpu_check_y"
    summary = tmp_path / "gpu_check_y.json"
    runner = subprocess.Popen([PY, "-c", RUNNER, str(prefix)], cwd=gpu_check.ROOT)
    deadline = time.monotonic() + 60
    while not summary.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    runner.kill()  # as the lease's end would, while "second" runs
    runner.wait()
    stages = json.loads(summary.read_text())["stages"]
    assert [(s["stage"], s["status"], s["last_line"]) for s in stages] == [("first", "ok", "done")]


def test_main_writes_the_summary_and_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "stages", lambda out_dir, prefix: [
        _stage("ok", "print(1)"), _stage("absent", "print(2)", skip="not in this tree")])
    assert gpu_check.main([str(tmp_path)]) == 0  # a stage with nothing to do is not a failure
    (summary,) = tmp_path.glob("gpu_check_*.json")
    assert [s["status"] for s in json.loads(summary.read_text())["stages"]] == ["ok", "skipped: not in this tree"]
    monkeypatch.setattr(gpu_check, "stages", lambda out_dir, prefix: [_stage("bad", "raise SystemExit(1)")])
    assert gpu_check.main([str(tmp_path / "again")]) == 1
    assert "| bad | FAIL(rc=1) |" in capsys.readouterr().out


# ---- the real plan -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return gpu_check.stages(out, out / "gpu_check_z")


def test_the_plan_fits_one_command_and_says_why(plan):
    names = [s.name for s in plan]
    assert len(set(names)) == len(names)
    for i, stage in enumerate(plan):
        assert stage.why and stage.limit_s > 0, stage.name
        assert set(stage.needs) <= set(names[:i]), stage.name  # prerequisites run first
    assert gpu_check.plan_seconds(plan) <= gpu_check.BUDGET_S
    with_everything = [gpu_check.Stage(s.name, s.limit_s, s.cmd, s.why, group=s.group) for s in plan]
    wheels = next(s for s in plan if s.name == "wheels")  # carried wheels are installed within the budget too
    assert gpu_check.plan_seconds(with_everything) - wheels.limit_s - gpu_check.GRACE_S <= gpu_check.BUDGET_S


def _collected(cmd):
    quiet = [a for a in cmd if a != "-v"] + ["--collect-only", "-q"]  # one test id a line
    done = subprocess.run(quiet, cwd=gpu_check.ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_the_test_stages_run_every_gpu_test_exactly_once(plan):
    """The stages' pytest selections (files, -k on dtype ids) partition the gpu-marked tests."""
    stages = [s for s in plan if s.junit]
    everything = _collected([PY, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "tests"])
    per_stage = [_collected(s.cmd) for s in stages]
    chosen = [test for tests in per_stage for test in tests]
    assert all(per_stage), [s.name for s, tests in zip(stages, per_stage) if not tests]
    assert len(chosen) == len(set(chosen)), "a test runs in two stages"
    assert sorted(chosen) == sorted(everything)
