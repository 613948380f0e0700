#!/usr/bin/env bash
# GPU check of nf4_gemm (the tiled tensor-core NF4 GEMM for 17..256 rows): build for sm_90 only,
# tests/test_nf4_gemm.py (+ the route tests of nf4_gemv / generate that changed with it),
# compute-sanitizer memcheck over the CUDA tests and racecheck over a few (the kernel's shared
# tiles are double-buffered with one barrier per k-step), then the benchmark. About 3 minutes on
# the H100 without the sanitizers, which are capped at 150 s (memcheck) and 90 s (racecheck) so the
# whole script fits one 10-minute device call. Results land in $OUT (default ./out).
#
#     bash benchmarks/gpu_checks/nf4_gemm.sh
set -uo pipefail
ROOT="$(cd "$(dirname "$0")" && while [ ! -f pyproject.toml ] && [ "$PWD" != / ]; do cd ..; done; pwd)"
cd "$ROOT"
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
status=0

export QLORA_CUDA_ARCHITECTURES="${QLORA_CUDA_ARCHITECTURES:-90}"
rm -rf /tmp/qlora-gpu-install
"$PY" -m pip install -q --no-build-isolation --no-deps -C build-dir=build/gpu --target /tmp/qlora-gpu-install . || exit 1
cp /tmp/qlora-gpu-install/qlora_ext/_C*.so python/qlora_ext/
if [ -f .peers/peers.tar.xz ] && [ ! -d /tmp/peers ]; then
  mkdir -p /tmp/peers && tar -C /tmp/peers -xJf .peers/peers.tar.xz
fi
export PYTHONPATH="$ROOT/python:$ROOT/tests:/tmp/peers"
"$PY" -c "import qlora_ext, torch; print(qlora_ext.build_info(), torch.__version__, torch.cuda.get_device_name())"

"$PY" -m pytest tests/test_nf4_gemm.py tests/test_bench_nf4_gemm.py -q -p no:cacheprovider -rfE 2>&1 \
  | tee "$OUT/test_nf4_gemm.txt" | tail -25 || status=1
"$PY" -m pytest tests/test_nf4_gemv.py tests/test_generate.py -q -p no:cacheprovider -rfE \
  -k "linear_forward or route or fused_gemv" 2>&1 | tail -8 || status=1

if command -v compute-sanitizer >/dev/null; then
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest tests/test_nf4_gemm.py \
    -q -p no:cacheprovider -x -k cuda 2>&1 | tail -6 | tee "$OUT/sanitizer_nf4_gemm_memcheck.txt" || status=1
  timeout 90 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" -m pytest tests/test_nf4_gemm.py \
    -q -p no:cacheprovider -x -k "cuda and (split_k or 200x4096-256 or 200x4096-17)" 2>&1 | tail -6 \
    | tee "$OUT/sanitizer_nf4_gemm_racecheck.txt" || status=1
else
  echo "compute-sanitizer not found: sanitizer pass skipped" | tee "$OUT/sanitizer_nf4_gemm.txt"
fi

"$PY" benchmarks/bench_nf4_gemm.py --out "$OUT/nf4_gemm_h100.json" 2>&1 | tee "$OUT/bench_nf4_gemm.txt" | tail -35 || status=1
exit $status
