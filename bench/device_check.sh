#!/usr/bin/env bash
# The one-shot GPU check: build on a GPU machine that already has torch, triton and nvcc, run every
# gpu-marked test (each backend against the reference), then the benchmarks; results go to OUTDIR.
#
#   bash bench/device_check.sh OUTDIR
#
# WHEELS=DIR installs pytest (and pytest-benchmark) from local wheels when the machine has no index.
# TORCH_CUDA_ARCH_LIST defaults to the local GPU's architecture to keep the build short.
# Time limits, so that one slow step cannot take the others' time: DEADLINE_S (whole script, default 420 s),
# TESTS_S (the gpu tests, 200 s), BENCH_S (each op benchmark, 50 s), TRAIN_S (the training step, 45 s). A step
# gets the smaller of its own limit and what is left before the deadline (less 20 s for the summary); a
# stopped step keeps what it wrote, and pick_defaults.py lets no backend qualify from unfinished tests.
# A dry run of the script's plumbing without a GPU (tests/test_bench.py does this): SKIP_BUILD=1 uses the installed
# build, BENCH_DEVICE=cpu benchmarks on the CPU, QUICK=1 passes --quick to the benchmarks.
set -uo pipefail
# PYTHON: the interpreter that holds torch (default python3, else python; some GPU images have no `python`).
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${1:?usage: bash bench/device_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - start )) s)"; }
DEADLINE_S=${DEADLINE_S:-420}
# budget LIMIT: LIMIT, or the seconds left before the deadline less 20, whichever is smaller (at least 1).
budget() {
  local left=$(( DEADLINE_S - ($(date +%s) - start) - 20 ))
  (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"
}

step "environment"
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  nvcc --version 2>&1 | tail -n 2
} | tee "$OUT/env.txt"

if [[ -n "${WHEELS:-}" ]]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" pytest pytest-benchmark >>"$OUT/build.log" 2>&1
fi

BENCH_DEVICE=${BENCH_DEVICE:-cuda}
quick=(); [[ "${QUICK:-0}" == 1 ]] && quick=(--quick)

step "build"
if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
  echo "SKIP_BUILD=1: using the installed build"
else
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
  fi
  # -v and ptxas -v: the compiler output, with each kernel's registers, spills and shared memory, goes to build.log.
  INSLOC_OPS_CUDA=1 INSLOC_OPS_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
    >>"$OUT/build.log" 2>&1 || { echo "BUILD FAILED (see build.log)"; tail -n 30 "$OUT/build.log"; exit 1; }
fi
"$PY" -c "import insloc_ops, json; print(json.dumps(insloc_ops.build_info())); print(json.dumps(insloc_ops.available_backends()))" \
  | tee -a "$OUT/env.txt"

step "gpu tests"
# SIGINT at the limit: pytest stops as on Ctrl-C, still writing the JUnit XML of what ran; timeout exits 124.
# --continue-on-collection-errors: a test module that fails to import (a package the machine lacks) fails its
# own op's tests (exit 1) instead of stopping the whole run (exit 2, which would qualify no backend at all).
# TEST_WORKERS (default 8): pytest-xdist processes, where it is installed. Most of the tests' time is Triton
# compiling each kernel variant on the CPU, one at a time per process; the tests share the GPU.
workers=()
if [[ "${TEST_WORKERS:-8}" -gt 1 ]] && "$PY" -c "import xdist" 2>/dev/null; then
  workers=(-n "${TEST_WORKERS:-8}")
fi
timeout -s INT -k 15 "$(budget "${TESTS_S:-200}")" \
  "$PY" -m pytest -m gpu -q -p no:cacheprovider -rf --continue-on-collection-errors "${workers[@]}" \
  --junitxml="$OUT/gpu_tests.xml" >"$OUT/gpu_tests.txt" 2>&1
tests_rc=$?
echo "$tests_rc" >"$OUT/gpu_tests.rc"
tail -n 15 "$OUT/gpu_tests.txt"

step "op benchmarks"
bench_s=$(budget $(( 3 * ${BENCH_S:-50} )))
"$PY" bench/run_all.py --device "$BENCH_DEVICE" "${quick[@]}" --out "$OUT" --timeout $(( bench_s / 3 > 1 ? bench_s / 3 : 1 )) >"$OUT/bench.log" 2>&1
bench_rc=$?

if [[ -f bench/bench_train_step.py ]]; then
  step "training step benchmark"
  timeout -k 10 "$(budget "${TRAIN_S:-45}")" \
    "$PY" bench/bench_train_step.py --device "$BENCH_DEVICE" "${quick[@]}" --data imagenet-like --out "$OUT/train_step.csv" >>"$OUT/bench.log" 2>&1 || bench_rc=1
fi

step "summary"
echo "gpu tests exit $tests_rc; benchmarks exit $bench_rc"
[[ -f "$OUT/ops.md" ]] && cat "$OUT/ops.md"
# Which backend each op may default to on CUDA (verified by the tests above and faster at every shape).
"$PY" bench/pick_defaults.py "$OUT" | tee "$OUT/defaults.md"
exit $(( tests_rc || bench_rc ))
