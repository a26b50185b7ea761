"""The one prepared GPU run: one lease of a GPU machine (about 15 minutes of device time, start-up included, at
most 10 minutes per command) turned into a complete, readable verdict. ``bash bench/gpu_check.sh OUT_DIR`` runs
``python3 bench/gpu_check.py OUT_DIR``.

Every stage has a time limit and leaves readable output even when it is cut off:
- at its limit it gets SIGINT (pytest then still writes its junit XML and summary), SIGKILL GRACE_S later (what
  `timeout -s INT -k 5` does, for the stage's whole process group);
- its log is written as it goes: pytest runs -v (one line per test) with a faulthandler timeout (a stuck test's
  stack is dumped), bench/run.py writes each row as measured, the GPU cases print one line per case;
- the summary (OUT_DIR/gpu_check_<stamp>.json and .md) is rewritten after every stage, so a run cut off as a
  whole still leaves one. It names the card, driver, versions and commit, each stage's status, seconds and test
  counts, and every failed test id: enough to judge the run without the logs.
A stage whose prerequisite failed is skipped with the reason (without the extensions every pytest process would
try to build them itself, for minutes). The test and sanitizer stages run side by side (GROUP): they are
host-bound (Python, float64 oracles, Triton compiles, the sanitizers' instrumentation) on a 16-core host; the
benchmarks run alone afterwards.

The plan (worst case: every stage at its limit plus the grace) must fit one command of 9 minutes; each limit
says what it is sized from (``Stage.why``), numbers measured on the 2-core development machine unless said.
Stand-in stages test the mechanics on the CPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 540  # one command of at most 9 minutes (a command may run 10; the rest is start-up and copying)
GRACE_S = 5  # SIGINT -> SIGKILL: pytest writes its junit report in well under a second
GROUP = "tests"  # the stages that run side by side
PYTEST = ["-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfE", "-o", "faulthandler_timeout=60"]


@dataclasses.dataclass
class Stage:
    """One step: ``cmd`` run in ROOT with ``env`` added, under ``limit_s``. ``junit``: a pytest stage (its report
    goes to <prefix>_<name>.xml). ``needs``: stages that must have passed. ``skip``: why it cannot run (None:
    it can). ``group``: stages of one group run at the same time. ``why``: what the limit is sized from."""

    name: str
    limit_s: int
    cmd: list[str]
    why: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    junit: bool = False
    needs: tuple[str, ...] = ()
    skip: str | None = None
    group: str | None = None


def plan_seconds(stages: list[Stage]) -> int:
    """Worst-case wall-clock seconds: sequential stages add up, a group costs its longest stage."""
    total, groups = 0, {}
    for s in stages:
        cost = 0 if s.skip else s.limit_s + GRACE_S
        if s.group is None:
            total += cost
        else:
            groups[s.group] = max(groups.get(s.group, 0), cost)
    return total + sum(groups.values())


# ---- running stages ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    stage: str
    status: str  # ok | FAIL(rc=N) | FAIL(no tests ran) | timeout(Ns) | skipped: why (not a failure) | blocked: why
    seconds: float
    limit_s: int
    log: str
    last_line: str = ""
    tests: dict | None = None  # {"tests", "passed", "failures", "errors", "skipped"} from junit or the -v log
    failed: list[str] = dataclasses.field(default_factory=list)
    triton_compiles: int | None = None


class Running:
    """A started stage: its process group, log file and deadline."""

    def __init__(self, stage: Stage, prefix: Path, cache: Path):
        self.stage, self.log = stage, Path(f"{prefix}_{stage.name}.log")
        self.junit = Path(f"{prefix}_{stage.name}.xml") if stage.junit else None
        self.cache = cache / stage.name
        cmd = stage.cmd + ([f"--junitxml={self.junit}"] if self.junit else [])
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(self.cache), **stage.env}
        self.out = self.log.open("w")
        self.out.write(f"$ {' '.join(cmd)}\n")
        self.out.flush()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.interrupted_at = None

    def poll(self) -> Result | None:
        """The result once the process has ended; sends SIGINT at the limit and SIGKILL GRACE_S later."""
        elapsed = time.monotonic() - self.start
        if self.proc.poll() is None:
            if self.interrupted_at is None and elapsed >= self.stage.limit_s:
                self._signal(signal.SIGINT)
                self.interrupted_at = elapsed
            elif self.interrupted_at is not None and elapsed >= self.interrupted_at + GRACE_S:
                self._signal(signal.SIGKILL)
            return None
        self.out.close()
        if self.interrupted_at is not None:
            status = f"timeout({self.stage.limit_s}s)"
        else:
            status = "ok" if self.proc.returncode == 0 else f"FAIL(rc={self.proc.returncode})"
        result = Result(self.stage.name, status, round(elapsed, 1), self.stage.limit_s, self.log.name,
                        last_line(self.log))
        if self.stage.junit:
            result.tests, result.failed = test_counts(self.junit, self.log)
            if status == "ok" and not result.tests.get("tests"):
                result.status = "FAIL(no tests ran)"
        compiled = list(self.cache.rglob("*.cubin")) if self.cache.exists() else []
        result.triton_compiles = len(compiled) or None
        return result

    def _signal(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:120] if lines else ""


_VERBOSE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def test_counts(junit: Path, log: Path) -> tuple[dict, list[str]]:
    """Counts and failed test ids from pytest's junit XML, or, where it wrote none (killed), from its -v log."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return _counts_from_log(log)
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "source": "junit"}, failed


def _counts_from_log(log: Path) -> tuple[dict, list[str]]:
    outcomes = [m.groups() for line in log.read_text(errors="replace").splitlines() if (m := _VERBOSE.match(line))]
    kinds = [o for _, o in outcomes]
    counts = {"tests": len(outcomes), "passed": kinds.count("PASSED"), "failures": kinds.count("FAILED"),
              "errors": kinds.count("ERROR"), "skipped": kinds.count("SKIPPED")}
    return {**counts, "source": "log (no junit report)"}, [t for t, o in outcomes if o in ("FAILED", "ERROR")]


def _not_run(stage: Stage, results: dict[str, Result]) -> str | None:
    """Why the stage does not run: "skipped: ..." (nothing to do), "blocked: ..." (a prerequisite failed)."""
    if stage.skip:
        return f"skipped: {stage.skip}"
    bad = [n for n in stage.needs if n not in results or results[n].status != "ok"]
    return f"blocked: needs {', '.join(bad)}" if bad else None


def let_children_take_sigint():
    """A runner started in the background by a non-interactive shell (`cmd &`, nohup, some remote runners) has
    SIGINT ignored, and an ignored signal stays ignored across exec: every stage would inherit it, pytest would
    never see its SIGINT and would be killed GRACE_S later without writing its junit. A Python handler here is
    reset to the default in each child at exec, so the stages take SIGINT whatever started this process."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_plan(stages: list[Stage], prefix: Path, on_result=None, poll_s: float = 0.2) -> list[Result]:
    """Run the stages in order (a group's stages together); on_result(results) after each one finishes."""
    let_children_take_sigint()
    results: dict[str, Result] = {}
    cache = Path(tempfile.mkdtemp(prefix="gpu_check_triton_"))

    def record(result):
        results[result.stage] = result
        print(f"[gpu_check] {result.stage}: {result.status} in {result.seconds:.0f} s", file=sys.stderr, flush=True)
        if on_result:
            on_result(list(results.values()))

    i = 0
    while i < len(stages):
        batch = [stages[i]]
        while stages[i].group and i + len(batch) < len(stages) and stages[i + len(batch)].group == stages[i].group:
            batch.append(stages[i + len(batch)])
        i += len(batch)
        running = []
        for stage in batch:
            why = _not_run(stage, results)
            if why:
                record(Result(stage.name, why, 0.0, stage.limit_s, ""))
            else:
                running.append(Running(stage, prefix, cache))
        while running:
            time.sleep(poll_s)
            for r in list(running):
                if (result := r.poll()) is not None:
                    running.remove(r)
                    record(result)
    shutil.rmtree(cache, ignore_errors=True)
    return [results[s.name] for s in stages]


# ---- the summary --------------------------------------------------------------------------------------------
def write_summary(prefix: Path, info: dict, results: list[Result]) -> str:
    """Write <prefix>.json and <prefix>.md (atomically); return the table."""
    stages = [dataclasses.asdict(r) for r in results]
    failed = [f"{r.stage}: {t}" for r in results for t in r.failed]
    data = {**info, "stages": stages, "failed_tests": failed}
    partial = Path(f"{prefix}.json.partial")
    partial.write_text(json.dumps(data, indent=1))
    os.replace(partial, f"{prefix}.json")
    lines = [" | ".join(f"{k} {info[k]}" for k in ("card", "driver", "torch", "cuda", "triton", "commit")
                        if info.get(k)), "",
             "| stage | status | s | limit | tests (passed/failed/errors/skipped) | triton compiles | last line |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        t = r.tests
        tests = f"{t['tests']} ({t['passed']}/{t['failures']}/{t['errors']}/{t['skipped']})" if t else ""
        lines.append(f"| {r.stage} | {r.status} | {r.seconds:.0f} | {r.limit_s} | {tests} | "
                     f"{r.triton_compiles or ''} | {r.last_line.replace('|', '/')} |")
    if failed:
        lines += ["", f"failed ({len(failed)}):", *failed[:50]]
    table = "\n".join(lines) + "\n"
    Path(f"{prefix}.md").write_text(table)
    return table


def machine_info(prefix: Path) -> dict:
    """Card, versions and commit: from the preflight stage's JSON where it ran, plus what needs no torch."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": os.environ.get("FUSEDRNN_COMMIT") or _output(["git", "rev-parse", "HEAD"]) or "unknown",
            "driver": _output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            "plan_s": None}
    try:
        info.update(json.loads(Path(f"{prefix}_preflight.json").read_text()))
    except (OSError, ValueError):
        pass
    return info


def _output(cmd) -> str | None:
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# ---- the real plan --------------------------------------------------------------------------------------------
# test_triton_gpu.py in one process per dtype (-k on the test ids): (tag, selection, distinct kernels, limit s).
# The last selection is the complement of the others ("float16" also matches "bfloat16"), so a new test lands in
# some stage whatever its id. Both variants of a dtype share one process: the persistent variant's kernels are
# among the split variant's (same constexprs and specialisations), so each compiles once. Kernels counted on the
# CPU by recording every launch of the file's cases (kernel, constexprs, compile options, argument dtypes, Triton's
# integer and pointer specialisations): 116 for float32 (tf32 included, the graph-replay test's kernel counted as
# new; 55 tests), 95 each for float16 and bfloat16 (44 tests each); at <= 1.2 s a compile for sm_90 (measured here
# under load) that is 139 s and 114 s. The tests' float64 truth: 4 s for all 142 oracle checks (measured here, one
# thread); torch and CUDA start-up ~5 s. The rest of each limit is margin (15-20 %).
TRITON_SPLIT = [("fp16", "float16 and not bfloat16", 95, 145),
                ("bf16", "bfloat16", 95, 145),
                ("fp32", "not float16", 116, 175)]
OWN_STAGE = ("test_cuda.py", "test_triton_gpu.py", "test_fuzz.py", "test_determinism.py")  # not in tests_other


def card_arch() -> str | None:
    """This card's compute capability ("9.0"), from the driver (no CUDA context in this process)."""
    out = _output(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def stages(out_dir: Path, prefix: Path) -> list[Stage]:
    py = sys.executable
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or card_arch()  # None: torch asks the visible card itself
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    strict = {"FUSEDRNN_STRICT_FP32": "1", "OMP_NUM_THREADS": "2"}
    gpu_tests = [py, *PYTEST, "-m", "gpu"]
    sanitize = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "CUDA_MODULE_LOADING": "LAZY", "OMP_NUM_THREADS": "2"}
    return [
        Stage("wheels", 30, [py, "-m", "pip", "install", "--no-index", "--no-deps", *wheels],
              "installs the carried wheels (.whl/), each a local file", skip=None if wheels else "no .whl/ carried"),
        Stage("preflight", 10, [py, "bench/gpu_preflight.py", f"{prefix}_preflight.json"],
              "imports torch and triton (~3 s) and asks the driver; no compiling"),
        Stage("build", 90, [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", "."],
              "ninja, all cores, this card's arch only: the slowest unit (the binding, 31 s here) bounds it; each "
              ".cu 13-17 s, each csrc/cpu file ~11 s here, in parallel; + ~10 s of pip",
              env={"FUSEDRNN_BUILD_CUDA": "1", "FUSEDRNN_BUILD_CPP": "1", "MAX_JOBS": str(os.cpu_count() or 4),
                   **({"TORCH_CUDA_ARCH_LIST": arch} if arch else {})}),
        Stage("import", 15, [py, "-c", "import fusedrnn._cuda as c, fusedrnn._cpp as p; print(c.__file__, p.__file__)"],
              "imports torch (~3 s) and the two extensions", needs=("build",)),
        Stage("smoke", 30, [py, "bench/gpu_cases.py", "smoke"],
              "6 cases (persistent, per-step, wavefront, gemm; Triton persistent and split) of <= 40 launches at "
              "T=4 and 3 Triton compiles (<= 1.2 s each) after ~5 s of torch and CUDA start-up; "
              "CUDA_LAUNCH_BLOCKING so a hang or fault stops at its case",
              env={"CUDA_LAUNCH_BLOCKING": "1"}, needs=("import",)),
        Stage("tests_cuda", 150, [*gpu_tests, "tests/test_cuda.py"],
              "374 tests of tiny shapes (3 schemes, CUDA-graph capture): the host's float64 oracle dominates "
              "(0.11 s a check here, 1 thread: ~41 s for 374)",
              env=strict, junit=True, needs=("import",), group=GROUP),
        *[Stage(f"tests_triton_{tag}", limit, [*gpu_tests, "tests/test_triton_gpu.py", "-k", select],
                f"{compiles} distinct kernels (counted here) x <= 1.2 s each to compile for sm_90 (measured here), + "
                "~10 s of start-up and float64 truth; one process per dtype so the compiles run side by side",
                env=strict, junit=True, group=GROUP) for tag, select, compiles, limit in TRITON_SPLIT],
        Stage("tests_fuzz", 150, [*gpu_tests, "tests/test_fuzz.py"],
              "45 hypothesis examples (15 per backend); Triton's compile 2-6 kernels each",
              env=strict, junit=True, needs=("import",), group=GROUP),
        Stage("tests_other", 150, [*gpu_tests, "tests", *(f"--ignore=tests/{f}" for f in OWN_STAGE)],
              "60 tests; T = 20,000 for the fused backends only (its float64 truth: 4-6 s a test here)",
              env=strict, junit=True, needs=("import",), group=GROUP),
        Stage("determinism", 60, [*gpu_tests, "tests/test_determinism.py"],
              "12 tests of 2 forward + backward passes each; cuBLAS deterministic (its workspace config)",
              env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, junit=True, needs=("import",), group=GROUP),
        Stage("memcheck", 150, [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", "--kernel-name",
                                "kns=fusedrnn", py, "bench/gpu_cases.py", "memcheck"],
              "19 cases (~240 of our launches at T=4: ~130 persistent and per-step, 112 gemm pointwise) after "
              "torch start-up under the tool, lazily loaded modules; 120 s before the 6 gemm cases, + 30 s for "
              "their small pointwise launches (cuBLAS's GEMMs run uninstrumented: kernel-name filter)",
              env=sanitize, needs=("import",), group=GROUP),
        Stage("racecheck", 150, [sanitizer, "--tool", "racecheck", "--racecheck-report", "hazard", "--error-exitcode",
                                 "1", "--kernel-name", "kns=fusedrnn", py, "bench/gpu_cases.py", "racecheck"],
              "5 persistent cases (~20 launches); racecheck instruments every shared-memory access",
              env=sanitize, needs=("import",), group=GROUP),
        Stage("calibrate", 90, [py, "bench/calibrate.py", "--out-dir", str(out_dir)],
              "bench/calibrate.py's contract: <= 90 s on a GPU, rows written as measured", needs=("import",)),
        Stage("bench", 60, [py, "bench/run.py", "--preset", "gpu-lease", "--device", "cuda", "--out-dir",
                            str(out_dir), "--quiet"],
              "20 points x 3 backends, ~0.1 s of timed calls each, + warm-up and Triton compiles; rows flushed",
              needs=("import",)),
        Stage("stack", 25, [py, "bench/stack_vs_layers.py", "--device", "cuda", "--backend", "cuda", "--out-dir",
                            str(out_dir)], "a few stack shapes x 3 candidates", needs=("import",)),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0] if argv else ROOT / "bench" / "results").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / f"gpu_check_{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}"
    plan = stages(out_dir, prefix)
    info = {"plan_s": plan_seconds(plan), "budget_s": BUDGET_S}
    print(f"[gpu_check] {len(plan)} stages, worst case {info['plan_s']} s; writing {prefix}.*", file=sys.stderr)

    def summarize(results):
        return write_summary(prefix, {**machine_info(prefix), **info}, results)

    results = run_plan(plan, prefix, on_result=summarize)
    print(summarize(results))
    print(f"files: {prefix}*")
    return 0 if all(r.status == "ok" or r.status.startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
