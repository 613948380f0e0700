#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, initcheck) over the pytest CUDA tests, on the GPU machine.
#
#   bash benchmarks/gpu_checks/sanitize_tests.sh [OUT_FILE] [JOBS]    (after building the extension)
#   ONLY='initcheck.*nf4' bash benchmarks/gpu_checks/sanitize_tests.sh ...   (the (tool, file) pairs matching a regex)
#   PYTEST_K='factored' ...   (only the tests pytest -k selects: a slow file split over device calls)
#   RUNS=$'racecheck tests/test_nf4_gemv.py 1\n...' K_1='cuda-mma' ...   (explicit runs "tool file [part]";
#        part N takes pytest -k "$K_N": one slow file split over parallel processes; "tool file part
#        FROM[:TO]" runs only the selection's tests FROM..TO-1 in collection order (to its end without
#        TO): one part split further, or the rest of a run that a time limit stopped)
#   KERNELS=qlora ...   (instrument only the kernels whose name contains it: compute-sanitizer
#        --kernel-name kns=...; racecheck then skips cuBLAS/cuDNN, whose hazards are not ours to fix,
#        and runs several times faster)
#
# memcheck runs every test file that launches our kernels, directly (kernel tests) or through the
# layers (model tests); racecheck and initcheck, an order of magnitude slower, get the kernel-level
# files only: the model-level tests reach the same kernels through the same operators. Each
# (tool, file) pair is one sanitized pytest process, JOBS of them at a time (default 8) on the one
# GPU, so the whole set fits one device call. pytest's own failures and the sanitizer's errors
# both fail the run (--error-exitcode 9). Tests marked not_under_sanitizer (they measure device
# memory or use the profiler, which the sanitizer changes) are deselected. Each run's full log
# lands in OUT_FILE's folder, sanitizer_logs/.
set -uo pipefail
out=${1:-sanitizer_tests.txt}
jobs=${2:-8}
kernel_tests="tests/test_nf4_ops.py tests/test_nf4_gemv.py tests/test_adamw_ops.py tests/test_lora_linear.py"
# test_generate.py and test_fused_qkv.py run whole models: ~45 minutes each under racecheck (cuDNN's
# SDPA, cuBLAS); the kernels they reach (nf4_gemv, nf4_dequantize_into, DoRA's) have kernel-level tests
model_tests="tests/test_paged_adamw.py tests/test_layers.py tests/test_lora_family.py tests/test_fused_loss.py
             tests/test_checkpointing.py tests/test_fused_mlp.py tests/test_prepare.py tests/test_bnb_checkpoint.py
             tests/test_generate.py tests/test_fused_qkv.py"
kernel_tests="$kernel_tests tests/test_block_ops.py tests/test_nf4_gemm.py"
logs="$(dirname "$out")/sanitizer_logs"
mkdir -p "$logs"
export logs
one() {  # "tool file [part]": one sanitized pytest run; prints one summary line, exits non-zero on any error
  set -- $1
  local k="${PYTEST_K:-}" part="${3:-}"
  if [ -n "$part" ]; then local kvar="K_$part"; k="${!kvar}"; fi
  local range="${4:-}" targets=("$2")
  local log="$logs/$1-$(basename "$2" .py)${part:+-part$part}${range:+-tests${range/:/-}}.log"
  if [ -n "$range" ]; then  # the node ids FROM..TO-1 (pytest prints one per line, then a summary)
    local from="${range%%:*}" to="${range#*:}"
    [ "$to" = "$range" ] && to=1000000000
    mapfile -t targets < <(python3 -m pytest -q -p no:cacheprovider --collect-only -m "not not_under_sanitizer" \
      ${k:+-k "$k"} "$2" | grep "::" | sed -n "$((from + 1)),${to}p")
  fi
  # memcheck and initcheck print their first 20 reports (initcheck reports library reads by the
  # hundred thousand: see sanitizer_tests_h100.txt); racecheck prints every one (0: no limit), so
  # each hazard is attributed to its kernel below: with a limit, the unprinted ones could be ours
  local limit=20
  [ "$1" = racecheck ] && limit=0
  compute-sanitizer --tool "$1" --target-processes all --error-exitcode 9 --print-limit "$limit" \
    ${KERNELS:+--kernel-name "kns=$KERNELS"} \
    python3 -m pytest -q -p no:cacheprovider -m "not not_under_sanitizer" ${k:+-k "$k"} "${targets[@]}" > "$log" 2>&1
  local rc=$?
  local result errors
  result=$(grep -E "^[0-9]+ (passed|failed)|passed|failed" "$log" | tail -1)
  errors=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | sort | uniq -c | tr -s ' ' | tr '\n' ';')
  # racecheck: the kernels its reports name, with counts (a qlora kernel among them is ours to fix)
  local kernels=""
  [ "$1" = racecheck ] && kernels=$(grep -oE "Race reported between [A-Za-z]+ access at [^+( ]+" "$log" |
    awk '{print $NF}' | sort | uniq -c | awk '{printf " %s x%s;", $2, $1}')
  echo "$1 $2${part:+ -k \"$k\"}${range:+ (tests $range of that selection: ${#targets[@]})}: rc=$rc | $result | $errors${kernels:+ | hazards in:$kernels}"
  [ "$rc" -eq 0 ] || { grep -E -A3 "Invalid|Uninitialized|hazard|FAILED" "$log" | head -12; return 1; }
}
export -f one
{
  echo "# compute-sanitizer over the pytest CUDA tests; $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); $(date -u +%F)"
  echo "# per line: compute-sanitizer --tool TOOL --target-processes all --error-exitcode 9${KERNELS:+ --kernel-name kns=$KERNELS} python -m pytest -q FILE${PYTEST_K:+ -k \"$PYTEST_K\"}"
  if [ -n "${RUNS:-}" ]; then
    echo "$RUNS"
  else
    for f in $kernel_tests $model_tests; do echo "memcheck $f"; done
    for f in $kernel_tests; do echo "racecheck $f"; echo "initcheck $f"; done
  fi | grep -E "${ONLY:-.}" | xargs -P "$jobs" -I{} bash -c 'one "{}"'
  status=$?
  echo "exit status: $status (0 = every run clean)"
  exit $status
} 2>&1 | tee "$out"
exit "${PIPESTATUS[0]}"
