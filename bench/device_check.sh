#!/usr/bin/env bash
# The one-shot GPU check: build on a GPU machine that already has torch, triton and nvcc, run every
# gpu-marked test (each backend against the reference), then the benchmarks; results go to OUTDIR.
#
#   bash bench/device_check.sh OUTDIR
#
# WHEELS=DIR installs pytest and pytest-benchmark (and torchvision, when missing) from local wheels when the
# machine has no index; without pytest or torchvision the script stops before the build (exit 3).
# TORCH_CUDA_ARCH_LIST defaults to the local GPU's architecture to keep the build short.
# Time limits, so that one slow step cannot take the others' time: DEADLINE_S (whole script, default 420 s),
# TESTS_S (the gpu tests, 200 s), BENCH_S (each op benchmark, 80 s), TRAIN_S (the training step, 45 s),
# PROFILE_S (bench/profile_ops.py, 60 s; on CUDA only), HOST_S (bench/bench_host.py, 30 s; on CUDA only),
# SANITIZE_S (memcheck, with SANITIZE=1, 90 s). A step gets the smaller of its own limit and what is left
# before the deadline (less 20 s for the summary); a stopped step keeps what it wrote, and pick_defaults.py
# lets no backend qualify from unfinished tests or benchmarks.
# ARCHIVE=FILE.tgz: OUTDIR packed into one file, refreshed at every step and when the script ends (also when
# stopped by SIGTERM or SIGINT), for a machine that hands back only a few files: the gpu tests alone write
# three files per test process.
# A dry run of the script's plumbing without a GPU (tests/test_bench.py does this): SKIP_BUILD=1 uses the installed
# build, BENCH_DEVICE=cpu benchmarks on the CPU, QUICK=1 passes --quick to the benchmarks.
set -uo pipefail
# PYTHON: the interpreter that holds torch (default python3, else python; some GPU images have no `python`).
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${1:?usage: bash bench/device_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # relative to where the script was started, not to the repository it moves to
archive() {
  [[ -n "${ARCHIVE:-}" ]] || return 0
  # (an ARCHIVE inside OUTDIR leaves itself out)
  tar czf "$ARCHIVE.part" --exclude="$(basename "$ARCHIVE")*" -C "$(dirname "$OUT")" "$(basename "$OUT")" \
    2>/dev/null && mv -f "$ARCHIVE.part" "$ARCHIVE"
}
if [[ -n "${ARCHIVE:-}" ]]; then  # (the same)
  mkdir -p "$(dirname "$ARCHIVE")"
  ARCHIVE=$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")
  trap archive EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT
fi
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { archive; echo "== $* ($(( $(date +%s) - start )) s)"; }
DEADLINE_S=${DEADLINE_S:-420}
# budget LIMIT: LIMIT, or the seconds left before the deadline less 20, whichever is smaller (at least 1).
budget() {
  local left=$(( DEADLINE_S - ($(date +%s) - start) - 20 ))
  (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"
}

step "environment"
# Pre-flight: the tests need pytest and the baselines torchvision; without either the run would be spent for
# nothing, so it stops here. WHEELS=DIR brings them from local wheels.
if [[ -n "${WHEELS:-}" ]]; then
  "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" pytest pytest-benchmark \
    >>"$OUT/build.log" 2>&1 || echo "pip install from $WHEELS failed (see build.log)"
  # --no-deps: a torchvision wheel pins a torch; the installed torch stays.
  "$PY" -c "import torchvision" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check --no-index \
    --no-deps --find-links "$WHEELS" torchvision >>"$OUT/build.log" 2>&1
fi
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c "
import importlib, sys
print('python', sys.version.split()[0])
for name in ('torch', 'triton', 'torchvision', 'pytest', 'xdist'):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, '__version__', '?'), *(('cuda', m.version.cuda) if name == 'torch' else ()))
    except Exception as e:
        print(name, 'not importable:', repr(e))"
  nvcc --version 2>&1 | tail -n 2
} | tee "$OUT/env.txt"
missing=$(sed -n -E 's/^(pytest|torchvision) not importable.*/\1/p' "$OUT/env.txt" | tr '\n' ' ')
if [[ -n "$missing" ]]; then
  echo "PRE-FLIGHT FAILED: $PY cannot import: ${missing% }. Nothing was built or run. Bring the wheels and rerun:"
  echo "  WHEELS=DIR bash bench/device_check.sh $OUT    # DIR holding pytest, pytest-benchmark, torchvision wheels"
  exit 3
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
  INSLOC_OPS_CUDA=1 INSLOC_OPS_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -v \
    --disable-pip-version-check --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1 \
    || { echo "BUILD FAILED (see build.log)"; tail -n 30 "$OUT/build.log"; exit 1; }
fi
"$PY" -c "import insloc_ops, json
print(json.dumps(insloc_ops.build_info())); print(json.dumps(insloc_ops.available_backends()))" | tee -a "$OUT/env.txt"
if [[ "$BENCH_DEVICE" == cuda ]]; then
  # The CUDA kernels must be usable here, or the gpu tests of every CUDA kernel skip and the run tells nothing of
  # them: stop now (exit 4), with the reason, and keep the time for a rebuild.
  why=$("$PY" -c "
import torch, insloc_ops
info = insloc_ops.build_info()
if not info['extension_loaded']:
    print('the extension did not load:', info['extension_error'])
elif not info['cuda_kernels_compiled']:
    print('the extension was built without CUDA kernels')
elif not torch.cuda.is_available():
    print('torch sees no CUDA device')
elif 'cuda' not in insloc_ops.available_backends()['roi_align_multilevel'].get('cuda', []):
    print('the CUDA kernels were not built for this GPU (compute capability %d.%d; built for %s)'
          % (*torch.cuda.get_device_capability(), ';'.join(info['cuda_archs'])))
" 2>"$OUT/preflight.err") || why="the check itself failed: $(tail -n 3 "$OUT/preflight.err")"
  if [[ -n "$why" ]]; then
    echo "PRE-FLIGHT FAILED: the CUDA kernels cannot run here: $why"
    echo "(BENCH_DEVICE=cpu runs the script's CPU dry run instead)"
    exit 4
  fi
fi

step "gpu tests"
# A CUDA error is sticky: once a kernel faults, every later CUDA call in that process fails. So the gpu tests run
# as one pytest process per (test module, selection), all at once: the selections (bench/pick_defaults.py
# --selections) split each module's tests into those naming only cuda, only triton, and the rest, so a faulting
# kernel fails its own backend's tests of its own module only. gpu_tests/MODULE.SELECTION.{xml,txt,rc} hold each
# one's JUnit XML, output and exit status, which pick_defaults.py merges.
# Each gets the same limit; SIGINT at the limit: pytest stops as on Ctrl-C, still writing the JUnit XML of what
# ran; timeout exits 124 (137 when it had to kill), which leaves that backend unqualified for that module's ops.
# --continue-on-collection-errors: a test module that fails to import (a package the machine lacks) fails its
# own op's tests (exit 1) instead of stopping the run (exit 2, unfinished).
# TEST_WORKERS (default 2): pytest-xdist workers in each process, where it is installed. Most of the tests' time
# is Triton compiling each kernel variant on the CPU, one at a time per process; the tests share the GPU.
workers=()
if [[ "${TEST_WORKERS:-2}" -gt 1 ]] && "$PY" -c "import xdist" 2>/dev/null; then
  workers=(-n "${TEST_WORKERS:-2}")
fi
mkdir -p "$OUT/gpu_tests"
tests_limit=$(budget "${TESTS_S:-200}")
modules=$(grep -l 'pytest\.mark\.gpu' tests/test_*.py)
# SANITIZE=1: beside the tests, compute-sanitizer's memcheck runs the CUDA C++ kernels' gpu tests (those
# naming cuda and not triton: Triton's compiles would take the time) in one more process, each tensor its own
# cudaMalloc (no caching allocator), so a read or write past a tensor's end is reported. Its limit is
# SANITIZE_S (default 90 s, at most the tests'); what it ran and found goes to memcheck.{txt,rc} (outside
# gpu_tests/, which pick_defaults.py reads). Where the machine's runtime refuses the sanitizer, memcheck.txt
# says so and nothing else depends on it.
if [[ "${SANITIZE:-0}" == 1 ]] && command -v compute-sanitizer >/dev/null; then
  sanitize_limit=$(( ${SANITIZE_S:-90} < tests_limit ? ${SANITIZE_S:-90} : tests_limit ))
  ( PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 15 "$sanitize_limit" compute-sanitizer --tool memcheck \
      --error-exitcode 99 --print-limit 20 "$PY" -m pytest tests/test_anchor_kernels.py \
      tests/test_infonce_kernels.py tests/test_roi_align_kernels.py -m gpu -k "cuda and not triton" -q \
      -p no:cacheprovider -rf >"$OUT/memcheck.txt" 2>&1
    echo $? >"$OUT/memcheck.rc" ) &
fi
while IFS=$'\t' read -r selection expr; do
  for path in $modules; do
    log="$OUT/gpu_tests/$(basename "$path" .py).$selection"
    ( timeout -s INT -k 15 "$tests_limit" "$PY" -m pytest "$path" -m gpu -k "$expr" -q -p no:cacheprovider -rf \
        --continue-on-collection-errors "${workers[@]}" --junitxml="$log.xml" >"$log.txt" 2>&1
      echo $? >"$log.rc" ) &
  done
done < <("$PY" bench/pick_defaults.py --selections)
wait
# The run's status: 0 when every process passed (or had no test selected), 1 when tests failed, else the first
# other exit status (stopped at the limit, interrupted, crashed). The processes of opt-in settings' tests
# (MODULE.settings) are listed but leave it alone, as they decide no default (bench/pick_defaults.py).
tests_rc=0
rc_files=("$OUT"/gpu_tests/*.rc)
if [[ ! -e "${rc_files[0]}" ]]; then  # the glob stayed a pattern: no test process ran at all
  echo "no GPU test process ran (no gpu-marked test module selected?)"
  tests_rc=2
  rc_files=()
fi
for rc_file in "${rc_files[@]}"; do
  rc=$(<"$rc_file")
  [[ "$rc" =~ ^[0-9]+$ ]] || rc=2  # an unreadable or empty status counts as a failure
  echo "$(basename "$rc_file" .rc): exit $rc, $(tail -n 1 "${rc_file%.rc}.txt")"
  [[ "$rc_file" == *.settings.rc ]] && continue
  case "$rc" in
    0|5) ;;
    1) (( tests_rc == 0 )) && tests_rc=1 ;;
    *) (( tests_rc <= 1 )) && tests_rc=$rc ;;
  esac
done
grep -h -E "^(FAILED|ERROR) " "$OUT"/gpu_tests/*.txt | head -n 20
if [[ -f "$OUT/memcheck.rc" ]]; then
  summary=$(grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.txt" | tail -n 2 | tr '\n' ' ')
  echo "memcheck: exit $(<"$OUT/memcheck.rc"), $summary"
  # 99: memcheck found an error (--error-exitcode): a failure; other statuses (refused, stopped) only inform
  [[ "$(<"$OUT/memcheck.rc")" == 99 ]] && (( tests_rc <= 1 )) && tests_rc=99
fi

step "op benchmarks"
bench_s=$(budget $(( 3 * ${BENCH_S:-80} )))
"$PY" bench/run_all.py --device "$BENCH_DEVICE" "${quick[@]}" --out "$OUT" \
  --timeout $(( bench_s / 3 > 1 ? bench_s / 3 : 1 )) >"$OUT/bench.log" 2>&1
bench_rc=$?

if [[ -f bench/bench_train_step.py ]]; then
  step "training step benchmark"
  timeout -k 10 "$(budget "${TRAIN_S:-45}")" \
    "$PY" bench/bench_train_step.py --device "$BENCH_DEVICE" "${quick[@]}" --data imagenet-like \
    --out "$OUT/train_step.csv" >>"$OUT/bench.log" 2>&1 || bench_rc=1
fi

if [[ -f bench/profile_ops.py && "$BENCH_DEVICE" == cuda ]]; then
  step "profile"
  # Host work against kernel time per call (see bench/profile_ops.py); informs, decides nothing.
  timeout -k 10 "$(budget "${PROFILE_S:-60}")" "$PY" bench/profile_ops.py --out "$OUT/profile.csv" \
    >"$OUT/profile.log" 2>&1 || echo "profile_ops.py: exit $? (see profile.log)"
fi

if [[ -f bench/bench_host.py && "$BENCH_DEVICE" == cuda ]]; then
  step "host cost"
  # Host work per call at tiny shapes, fused and baseline (see bench/bench_host.py); informs, decides nothing.
  timeout -k 10 "$(budget "${HOST_S:-30}")" "$PY" bench/bench_host.py --device cuda --out "$OUT/host.csv" \
    >"$OUT/host.log" 2>&1 || echo "bench_host.py: exit $? (see host.log)"
fi

step "summary"
echo "gpu tests exit $tests_rc; benchmarks exit $bench_rc"
[[ -f "$OUT/ops.md" ]] && cat "$OUT/ops.md"
[[ -f "$OUT/profile.log" ]] && cat "$OUT/profile.log"
[[ -f "$OUT/host.log" ]] && cat "$OUT/host.log"
# Which backend each op may default to on CUDA (its tests above passed, and it beat the baseline at every shape in
# the op's deciding pass: bench/pick_defaults.py).
"$PY" bench/pick_defaults.py "$OUT" | tee "$OUT/defaults.md"
exit $(( tests_rc || bench_rc ))
