#!/usr/bin/env bash
# GPU check of the fused transformer-block ops (RMSNorm, RoPE, SwiGLU): build for sm_90 only, run
# tests/test_block_ops.py on CPU + CUDA, the block-op sanitizer workload under memcheck and
# racecheck, then time each op against the PyTorch composite at Llama-3-8B shapes (2048 tokens,
# D 4096, I 14336, 32/8 heads of 128, bf16). About 3 minutes on the H100, most of it the build.
# Results land in $OUT (default ./out).
#
#     bash benchmarks/gpu_checks/block_ops.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && while [ ! -f pyproject.toml ] && [ "$PWD" != / ]; do cd ..; done; pwd)"
cd "$ROOT"
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"

export QLORA_CUDA_ARCHITECTURES="${QLORA_CUDA_ARCHITECTURES:-90}"
rm -rf /tmp/qlora-gpu-install
"$PY" -m pip install -q --no-build-isolation --no-deps -C build-dir=build/gpu --target /tmp/qlora-gpu-install .
cp /tmp/qlora-gpu-install/qlora_ext/_C*.so python/qlora_ext/
export PYTHONPATH="$ROOT/python:$ROOT/tests"
"$PY" -c "import qlora_ext, torch; print(qlora_ext.build_info(), torch.__version__, torch.cuda.get_device_name())"

"$PY" -m pytest tests/test_block_ops.py -q -p no:cacheprovider -x 2>&1 | tee "$OUT/test_block_ops.txt"

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" benchmarks/sanitize_block_ops.py 2>&1 \
      | tail -5 | tee "$OUT/sanitizer_block_ops_$tool.txt"
  done
else
  echo "compute-sanitizer not found: sanitizer pass skipped" | tee "$OUT/sanitizer_block_ops.txt"
fi

"$PY" benchmarks/bench_block_ops.py --out "$OUT/block_ops_h100.json" 2>&1 | tee "$OUT/bench_block_ops.txt"
