#!/usr/bin/env bash
# GPU check of the triton and cuda backends, in one command, within 8 minutes:
#
#   bash benchmarks/gpu_check.sh
#
# On a machine with one CUDA GPU and torch + Triton already installed (nothing is downloaded):
#   1. installs this package in place with the CUDA kernels (AIGC_EXT_WITH_CUDA=1,
#      AIGC_EXT_CUDA_ARCHS=90a; needs nvcc and the CUTLASS headers: AIGC_EXT_CUTLASS_INCLUDE, the
#      nvidia-cutlass wheel installed, or its wheel file in .whl/, unpacked into /tmp);
#      if that build fails, installs it without them so that the triton stages still run;
#   2. runs the triton and cuda tests on the GPU (tests/attention/test_triton*.py, the contract
#      suites' triton and cuda cases, tests/flash/test_triton_flash.py, tests/cuda with its
#      compute-sanitizer run; AIGC_EXT_TEST_DEVICE=cuda), split over parallel pytest processes because Triton
#      compiles kernels on one core per process;
#   3. benchmarks the triton and cuda backends against torch's SDPA backends (flash, efficient,
#      cuDNN), then against torch.compile'd FlexAttention (benchmarks/bench_gpu.py), bf16, head
#      dims 64, 128 and 256, H * E = 2048, L = S in 1k..16k with B * L = 16k, causal and not,
#      fwd and fwd+bwd, with a bf16 matmul rate for the "% of matmul" columns;
#   4. prints the test counts and the benchmark table.
#
# Every stage runs under `timeout` with a share of the overall budget (GPU_CHECK_BUDGET seconds,
# default 450); a stage cut short keeps what it produced (the benchmark appends each measurement
# to a JSON-lines file), and the summary says which stages timed out.
# Results go to $OUT (default ./gpu-check-results): gpu_check.log (this summary), install.log,
# tests.log (all shards; tests-shard-*.log each), bench_gpu.jsonl (every measurement),
# bench_gpu_summary.json (all measurements and the summary table's data).
# Autotuning uses the reduced config set (AIGC_EXT_TRITON_AUTOTUNE=fast) to fit the budget;
# set AIGC_EXT_TRITON_AUTOTUNE=full to tune over every config (needs a longer budget).

set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-450}
OUT_DIR=${OUT:-gpu-check-results}
PY=${PYTHON:-python}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
export AIGC_EXT_TRITON_AUTOTUNE=${AIGC_EXT_TRITON_AUTOTUNE:-fast}
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/aigc-ext-triton-cache}
unset TRITON_INTERPRET
NPROC=$(nproc 2>/dev/null || echo 8)
STATUS=()

say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# seconds a stage may take: at most $1, leaving $2 seconds for the stages after it
allot() {
  local want=$1 reserve=$2 left
  left=$(( BUDGET - ($(date +%s) - START) - reserve ))
  if (( left < want )); then want=$left; fi
  if (( want < 0 )); then want=0; fi
  echo "$want"
}

# run NAME SECONDS CMD...: runs CMD under timeout, output to $OUT_DIR/NAME.log and the terminal
run() {
  local name=$1 secs=$2 rc
  shift 2
  if (( secs < 5 )); then
    say "$name: skipped (no time left)"
    STATUS+=("$name: skipped (no time left)")
    return 124
  fi
  say "$name: starting (limit ${secs}s): $*"
  timeout -k 10 "$secs" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) STATUS+=("$name: ok") ;;
    124|137) STATUS+=("$name: TIMED OUT after ${secs}s (partial results kept)") ;;
    *) STATUS+=("$name: failed (exit $rc)") ;;
  esac
  say "$name: exit $rc"
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
say "machine"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} 2>&1 | tee -a "$LOG"

# ---------------------------------------------------------------------------------------------
export MAX_JOBS=${MAX_JOBS:-$NPROC}
PIP_INSTALL=("$PY" -m pip install --no-build-isolation --no-deps --no-index -e .)
CUDA_BUILT=0
# CUTLASS/CuTe headers: AIGC_EXT_CUTLASS_INCLUDE, the installed nvidia-cutlass wheel, or that
# wheel carried in .whl/ (an image without it: `pip download --no-deps nvidia-cutlass==4.2.0.0
# -d .whl` beforehand), unpacked here into a private folder.
CUTLASS_WHEEL=$(ls .whl/nvidia_cutlass-*.whl 2> /dev/null | head -n 1)
if [[ -z "${AIGC_EXT_CUTLASS_INCLUDE:-}" && -n "$CUTLASS_WHEEL" ]] &&
  ! "$PY" -c "import cutlass_library" > /dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/aigc-ext-cutlass \
    "$CUTLASS_WHEEL" >> "$OUT_DIR/install-cuda.log" 2>&1; then
    export AIGC_EXT_CUTLASS_INCLUDE=/tmp/aigc-ext-cutlass/cutlass_library/source/include
    say "install-cuda: CUTLASS headers from $CUTLASS_WHEEL"
  fi
fi
if ! command -v nvcc > /dev/null 2>&1; then
  say "install-cuda: no nvcc on PATH; building without the CUDA kernels"
  STATUS+=("install-cuda: failed (no nvcc)")
elif [[ -z "${AIGC_EXT_CUTLASS_INCLUDE:-}" ]] && ! "$PY" -c "import cutlass_library" > /dev/null 2>&1; then
  say "install-cuda: no CUTLASS headers (AIGC_EXT_CUTLASS_INCLUDE unset, no nvidia-cutlass wheel installed or in .whl/); building without the CUDA kernels"
  STATUS+=("install-cuda: failed (no nvidia-cutlass wheel)")
elif AIGC_EXT_WITH_CUDA=1 AIGC_EXT_CUDA_ARCHS=${AIGC_EXT_CUDA_ARCHS:-90a} \
    run install-cuda "$(allot 300 170)" "${PIP_INSTALL[@]}"; then
  CUDA_BUILT=1
else
  say "install-cuda: the CUDA build failed (see install-cuda.log); building without the CUDA kernels"
fi
if (( ! CUDA_BUILT )) && ! run install "$(allot 240 150)" "${PIP_INSTALL[@]}"; then
  say "install failed: the package cannot be imported, stopping"
  printf '%s\n' "${STATUS[@]}" | tee -a "$LOG"
  exit 1
fi
"$PY" -c "from aigc_ext.backends.cuda.backend import unavailable_reason as r; print('cuda backend:', r() or 'available')" 2>&1 | tee -a "$LOG"

# ---------------------------------------------------------------------------------------------
# Tests: collected once, then split round-robin over SHARDS pytest processes (pytest-xdist is
# used instead when installed).
TEST_SECS=$(allot 170 170)
SHARDS=${SHARDS:-$(( NPROC > 16 ? 8 : (NPROC + 1) / 2 ))}
export AIGC_EXT_TEST_DEVICE=cuda
PYTEST_ARGS=(-p no:cacheprovider -rfEs -v --maxfail=200)
TEST_SEL=(tests/attention/test_triton.py tests/attention/test_triton_nonfinite.py tests/attention/test_triton_opcheck.py tests/attention/test_triton_tools.py tests/attention/test_attention_contract.py tests/flash/test_triton_flash.py tests/flash/test_flash_contract.py tests/cuda -k "triton or cuda")
if "$PY" -c "import xdist" 2>/dev/null; then
  run tests "$TEST_SECS" "$PY" -m pytest "${TEST_SEL[@]}" "${PYTEST_ARGS[@]}" -n "$SHARDS"
else
  IDS="$OUT_DIR/test-ids.txt"
  "$PY" -m pytest --collect-only -q "${TEST_SEL[@]}" -p no:cacheprovider > "$OUT_DIR/collect.log" 2>&1
  grep '::' "$OUT_DIR/collect.log" > "$IDS" || true
  say "tests: $(wc -l < "$IDS") collected, $SHARDS shards, limit ${TEST_SECS}s"
  if [[ ! -s "$IDS" ]]; then
    tail -30 "$OUT_DIR/collect.log" | tee -a "$LOG"
    STATUS+=("tests: nothing collected (see collect.log)")
  fi
  rm -f "$OUT_DIR"/tests-shard-*.log "$OUT_DIR"/test-ids-shard-*
  split -n "r/$SHARDS" -d "$IDS" "$OUT_DIR/test-ids-shard-"
  PIDS=()
  for f in "$OUT_DIR"/test-ids-shard-*; do
    mapfile -t ids < "$f"
    (( ${#ids[@]} )) || continue
    timeout -k 10 "$TEST_SECS" "$PY" -m pytest "${ids[@]}" "${PYTEST_ARGS[@]}" \
      > "$OUT_DIR/tests-shard-${f##*-}.log" 2>&1 &
    PIDS+=($!)
  done
  TEST_RC=0
  for pid in "${PIDS[@]}"; do
    wait "$pid"
    rc=$?
    if (( rc == 124 || rc == 137 )); then TEST_RC=124; elif (( rc != 0 && TEST_RC == 0 )); then TEST_RC=$rc; fi
  done
  cat "$OUT_DIR"/tests-shard-*.log > "$OUT_DIR/tests.log" 2>/dev/null
  case $TEST_RC in
    0) if [[ -s "$IDS" ]]; then STATUS+=("tests: ok"); fi ;;
    124) STATUS+=("tests: TIMED OUT after ${TEST_SECS}s in some shard (partial results kept)") ;;
    *) STATUS+=("tests: failures (exit $TEST_RC)") ;;
  esac
fi
PASSED=$(grep -c ' PASSED' "$OUT_DIR/tests.log" 2>/dev/null)
FAILED=$(grep -c ' FAILED' "$OUT_DIR/tests.log" 2>/dev/null)
ERRORS=$(grep -c ' ERROR' "$OUT_DIR/tests.log" 2>/dev/null)
SKIPPED=$(grep -c ' SKIPPED' "$OUT_DIR/tests.log" 2>/dev/null)
say "tests: passed ${PASSED:-0}, failed ${FAILED:-0}, errors ${ERRORS:-0}, skipped ${SKIPPED:-0} (of those that ran)"
grep -E '^(FAILED|ERROR) ' "$OUT_DIR/tests.log" | sort -u | head -40 | tee -a "$LOG"
unset AIGC_EXT_TEST_DEVICE

# ---------------------------------------------------------------------------------------------
# Benchmark: ours and torch's SDPA backends first, FlexAttention (compiles per shape) after.
BENCH_SECS=$(allot 160 90)
run bench "$BENCH_SECS" "$PY" benchmarks/bench_gpu.py --out "$OUT_DIR" \
  --providers triton cuda flash efficient cudnn --time-budget $(( BENCH_SECS > 30 ? BENCH_SECS - 20 : 10 ))
FLEX_SECS=$(allot 200 25)
run bench-flex "$FLEX_SECS" "$PY" benchmarks/bench_gpu.py --out "$OUT_DIR" \
  --providers flex --matmul-size 0 --time-budget $(( FLEX_SECS > 30 ? FLEX_SECS - 20 : 10 ))

# ---------------------------------------------------------------------------------------------
say "summary"
"$PY" benchmarks/bench_gpu.py --report "$OUT_DIR/bench_gpu.jsonl" --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
printf '%s\n' "${STATUS[@]}" | tee -a "$LOG"
say "done; results in $OUT_DIR"
for s in "${STATUS[@]}"; do
  case $s in *": ok") ;; *) exit 1 ;; esac
done
exit 0
