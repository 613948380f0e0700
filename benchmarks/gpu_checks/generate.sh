#!/usr/bin/env bash
# GPU check of qlora_ext.generate (issue #5) on the H100: build, the CUDA tests of generate (graph
# replay == eager steps, the decode route takes nf4_gemv) and of the layers whose no-grad CUDA
# route changed, then the 8B decode benchmark (bf16 vs bitsandbytes vs NF4 merged / LoRA active).
#
#   bash benchmarks/gpu_checks/generate.sh         (repository root; logs and JSON go to $OUT)
#
# ~3-4 minutes: build ~1-2, tests ~1, benchmark ~1.5 (8B: 16 GB bf16 + a bnb copy + NF4).
# Commit $OUT/decode_8b_h100.json as benchmarks/results/decode_8b_h100.json.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_generate}
mkdir -p "$OUT"
export QLORA_CUDA_ARCHITECTURES=90 PYTHONUNBUFFERED=1
if [ -f .peers/peers.tar.xz ]; then mkdir -p /tmp/peers && tar -C /tmp/peers -xJf .peers/peers.tar.xz; fi
python3 -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
cp "$(python3 -c "import site;print(site.getsitepackages()[0])")"/qlora_ext/_C*.so python/qlora_ext/
export PYTHONPATH=python:/tmp/peers
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

python3 -m pytest tests/test_generate.py -q -p no:cacheprovider -rfE > "$OUT/pytest_generate.log" 2>&1
echo "pytest test_generate rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_generate.log" | head -20; tail -1 "$OUT/pytest_generate.log"
# Layers under no_grad on CUDA now take nf4_gemv for <= 16 rows: the tests of those layers again.
python3 -m pytest tests/test_nf4_gemv.py tests/test_lora_linear.py tests/test_layers.py tests/test_lora_family.py \
  tests/test_prepare.py tests/test_builtin.py -q -p no:cacheprovider -rfE -n 8 > "$OUT/pytest_layers.log" 2>&1
echo "pytest layers rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_layers.log" | head -20; tail -1 "$OUT/pytest_layers.log"

timeout 420 python3 benchmarks/bench_decode.py --out "$OUT/decode_8b_h100.json" > "$OUT/bench_decode.log" 2>&1
echo "bench_decode rc=$?"; grep -E "^#" "$OUT/bench_decode.log" | head; tail -9 "$OUT/bench_decode.log"
