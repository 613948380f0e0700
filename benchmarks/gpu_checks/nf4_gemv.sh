#!/usr/bin/env bash
# GPU check of nf4_gemv's kernel variants (issue #5): build for sm_90, the CUDA tests of
# tests/test_nf4_gemv.py for every variant (+ nf4_gemm's, which share the reference), then the
# A/B benchmark: every variant against bf16 cuBLAS (and bitsandbytes when bundled), same process.
# A few minutes on the H100. Results land in $OUT (default ./out).
#
#     bash benchmarks/gpu_checks/nf4_gemv.sh
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
status=0
bash benchmarks/gpu_checks/run.sh build || exit 1
export PYTHONPATH="$ROOT/python:$ROOT/tests:/tmp/peers"

"$PY" -m pytest tests/test_nf4_gemv.py -q -p no:cacheprovider -rfE -n 8 -k "cuda or variant" 2>&1 \
  | tee "$OUT/test_nf4_gemv_cuda.txt" | tail -15 || status=1
"$PY" -m pytest tests/test_nf4_gemm.py -q -p no:cacheprovider -rfE -n 8 -k cuda 2>&1 | tail -4 || status=1

# M = 1 and 16 are the bars; 4, 8 and 9 show the MT=1 / MT=2 switch.
"$PY" benchmarks/bench_nf4_linear.py --variants all --m 1 4 8 9 16 --out "$OUT/nf4_gemv_variants_h100.json" 2>&1 \
  | tee "$OUT/bench_nf4_gemv_variants.txt" | tail -48 || status=1
"$PY" benchmarks/bench_nf4_linear.py --variants all --m 1 16 --dtype float16 --shapes 4096x4096,28672x8192 \
  --out "$OUT/nf4_gemv_variants_fp16_h100.json" 2>&1 | tail -12 || status=1
exit $status
