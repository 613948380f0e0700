#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, initcheck) over the pytest CUDA tests, on the GPU machine.
#
#   bash benchmarks/gpu_checks/sanitize_tests.sh [OUT_FILE]     (after building the extension)
#
# Each tool runs every test (CPU cases cost little under the sanitizer) of each file that launches our kernels; pytest's
# own failures and the sanitizer's errors both fail the run (--error-exitcode 9). racecheck and
# initcheck are slower than memcheck by an order of magnitude, so they get the kernel-level
# files only; the model-level tests reach the same kernels through the same operators.
set -uo pipefail
out=${1:-sanitizer_tests.txt}
kernel_tests="tests/test_nf4_ops.py tests/test_nf4_gemv.py tests/test_adamw_ops.py tests/test_lora_linear.py"
model_tests="tests/test_paged_adamw.py tests/test_layers.py tests/test_lora_family.py tests/test_fused_loss.py
             tests/test_checkpointing.py tests/test_fused_mlp.py tests/test_prepare.py tests/test_bnb_checkpoint.py"
for extra in tests/test_block_ops.py tests/test_nf4_gemm.py tests/test_generate.py; do
  [ -f "$extra" ] && kernel_tests="$kernel_tests $extra"
done
status=0
exec > >(tee "$out") 2>&1
echo "# compute-sanitizer over the pytest CUDA tests; $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); $(date -u +%F)"
run() {  # tool, files...
  local tool=$1; shift
  echo "## compute-sanitizer --tool $tool --target-processes all --error-exitcode 9 python -m pytest $*"
  compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 9 \
    python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 |
    grep -E "passed|failed|ERROR SUMMARY|RACECHECK SUMMARY|Invalid|uninitialized|hazard" | sort | uniq -c | tail -12
  local rc=${PIPESTATUS[0]}
  echo "rc=$rc"
  [ "$rc" -eq 0 ] || status=1
}
run memcheck $kernel_tests $model_tests
run racecheck $kernel_tests
run initcheck $kernel_tests
exit $status
