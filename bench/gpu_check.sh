#!/usr/bin/env bash
# The one prepared GPU check: build, test, sanitize, benchmark, on a bare GPU machine with no network.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # OUT_DIR default: bench/results
#
# Needs what the GPU image has: python3 with a CUDA torch, triton, pybind11, ninja, pytest, nvcc and
# compute-sanitizer. Stages (each under a time limit; a failing stage is recorded and the next runs):
#   build     pip install --no-build-isolation --no-deps -e .  (CUDA + C++ extensions, this card's arch)
#   tests     pytest -m gpu: every GPU backend vs cuDNN and float64, NaN-poisoned outputs (CUDA's first)
#   memcheck  compute-sanitizer memcheck over one short case per kernel (every cell, both schemes)
#   racecheck compute-sanitizer racecheck over the same cases (shared-memory hazards)
#   bench     python bench/run.py --preset quick --device cuda
#   stack     python bench/stack_vs_layers.py: the wavefront vs the same stack layer by layer vs cuDNN
# Writes into OUT_DIR: gpu_check_<stamp>.json (card, driver, versions, commit, stage results) and one
# log per stage; bench/run.py adds its CSV/JSON/PNG. Prints a summary table last. Whole run < 8 min.
# FUSEDRNN_COMMIT overrides the commit recorded (the device machine may have no .git).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-bench/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
PREFIX="$OUT_DIR/gpu_check_$STAMP"
SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export FUSEDRNN_BUILD_CUDA=1
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"  # build for this card only
declare -a ROWS=()

# stage NAME LIMIT_S CMD...: run CMD with a time limit, log to $PREFIX_NAME.log, record status and time.
stage() {
  local name="$1" limit="$2"
  shift 2
  local log="${PREFIX}_${name}.log" start end rc
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  end=$(date +%s)
  local status=ok
  [ "$rc" -eq 124 ] && status="timeout(${limit}s)"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && status="FAIL(rc=$rc)"
  ROWS+=("$name|$status|$((end - start))|$(tail -n 1 "$log" | cut -c1-90)")
  echo "[gpu_check] $name: $status in $((end - start)) s" >&2
}

# One short forward + backward per kernel: every cell (lstm also with proj), both schemes, packed and
# bidirectional, and a 2-layer stack with dropout (the wavefront), so every kernel instantiation for float32
# runs under the sanitizer, with and without the layers above the first.
SANITIZE_CASES='
import torch, fusedrnn
from torch.nn.utils.rnn import pack_padded_sequence
from fusedrnn import cuda as backend
backend.POISON = True
torch.manual_seed(0)
cells = [(fusedrnn.LSTM, {}), (fusedrnn.LSTM, {"proj_size": 3}), (fusedrnn.GRU, {}),
         (fusedrnn.RNN, {"nonlinearity": "tanh"}), (fusedrnn.RNN, {"nonlinearity": "relu"})]
for scheme in ("persistent", "per_step"):
    backend.SCHEME = scheme
    for cls, kw in cells:
        model = cls(5, 6, bidirectional=True, backend="cuda", device="cuda", **kw)
        x = torch.randn(4, 3, 5, device="cuda", requires_grad=True)
        out, _ = model(pack_padded_sequence(x, torch.tensor([4, 2, 3]), enforce_sorted=False))
        out.data.square().sum().backward()
        assert backend.last_scheme() == scheme, (scheme, backend.last_scheme())
        stack = cls(5, 6, num_layers=2, dropout=0.5, backend="cuda", device="cuda", **kw)  # the wavefront
        stack(torch.randn(4, 3, 5, device="cuda", requires_grad=True))[0].square().sum().backward()
        assert backend.last_scheme() == scheme, (scheme, backend.last_scheme())
torch.cuda.synchronize()
print("sanitizer cases ran: 5 cells x 2 schemes x (bidirectional packed, 2-layer stack), forward + backward")
'

# Limits add up to 470 s: the whole run stays under 8 minutes with the summary.
stage build 150 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
stage tests_cuda 100 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="${PREFIX}_tests_cuda.xml" \
  tests/test_cuda.py
stage tests_rest 50 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="${PREFIX}_tests_rest.xml" tests \
  --ignore=tests/test_cuda.py
for tool in memcheck racecheck; do
  # No caching allocator: each tensor its own allocation, so memcheck sees every out-of-bounds access.
  stage "$tool" 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
    --kernel-name kns=fusedrnn "$PY" -c "$SANITIZE_CASES"
done
stage bench 55 "$PY" bench/run.py --preset quick --device cuda --out-dir "$OUT_DIR"
stage stack 25 "$PY" bench/stack_vs_layers.py --device cuda --backend cuda --out-dir "$OUT_DIR"

"$PY" - "$PREFIX" "${ROWS[@]}" <<'EOF'
import json, subprocess, sys, os
prefix, rows = sys.argv[1], [r.split("|", 3) for r in sys.argv[2:]]

def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:
        return f"unavailable ({e})"

info = {"stages": [{"stage": s, "status": st, "seconds": int(t), "last_line": l} for s, st, t, l in rows]}
info["commit"] = os.environ.get("FUSEDRNN_COMMIT") or run(["git", "rev-parse", "HEAD"]) or "unknown"
info["driver"] = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    p = torch.cuda.get_device_properties(0)
    info.update(card=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count)
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["versions_error"] = repr(e)
import xml.etree.ElementTree as ET
info["tests"], info["failed_tests"] = {}, []
for part in ("cuda", "rest"):
    try:
        suite = ET.parse(f"{prefix}_tests_{part}.xml").getroot()
    except Exception as e:
        info["tests"][part] = f"no junit report ({e})"
        continue
    suite = suite if suite.tag == "testsuite" else suite[0]
    info["tests"][part] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    info["failed_tests"] += [c.get("classname") + "::" + c.get("name") for c in suite.iter("testcase")
                             if c.find("failure") is not None or c.find("error") is not None]
with open(prefix + ".json", "w") as f:
    json.dump(info, f, indent=1)
print(f"\n{info.get('card')} | driver {info['driver']} | torch {info.get('torch')} CUDA {info.get('cuda')} "
      f"| triton {info.get('triton')} | commit {info['commit'][:12]}")
print(f"tests: {info['tests']}  failed: {info.get('failed_tests', [])[:8]}")
print(f"{'stage':10} {'status':16} {'s':>4}  last line of its log")
for s in info["stages"]:
    print(f"{s['stage']:10} {s['status']:16} {s['seconds']:>4}  {s['last_line']}")
print(f"files: {prefix}*")
EOF
