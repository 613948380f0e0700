#!/usr/bin/env bash
# Build and run the standalone check + benchmark of the Hopper NF4 GEMM (nf4_gemm_sm90_check.cu beside this file):
# correctness against cuBLAS on the dequantized weight at 9 shapes, then the M = 2048 timings against bf16 cuBLAS.
# No torch, no extension build: one nvcc call (sm_90a only), then the program under a timeout, because a kernel
# stuck in a barrier wait would otherwise hold the whole device call. Results land in $OUT (default ./out).
#
#     bash benchmarks/gpu_checks/nf4_gemm_sm90_check.sh [--check-only | --time-only] [--time-anyway]
#                                                       [--shapes NxK,...] [--m M]
#     SANITIZE=1 bash benchmarks/gpu_checks/nf4_gemm_sm90_check.sh   # memcheck over the checks instead
#     GPU_TAG=h200 ...                                                # names the result file
#     DIAG=1 (2, 3) ... --time-only      # the diagnostic builds (QLORA_SM90_DIAG in nf4_gemm_sm90_impl.cuh):
#                                        # 1 without the dequantization, 2 without the table, 3 with the
#                                        # dequantization not waited for; timings only
#     PRODUCER=1 ...                     # a producer warpgroup issues the copies (QLORA_SM90_PRODUCER_WG)
#     SLICED=1 ...                       # each k16 slice's wgmma issued as soon as it is dequantized (QLORA_SM90_SLICED)
#     CLUSTER=2 (or 4) ...               # clusters sharing X by TMA multicast (QLORA_SM90_CLUSTER_N)
#     SETS=3 ...                         # three A-register sets, two stages of wgmmas in flight (QLORA_SM90_SETS)
#     BF16_PAIRS=1 ...                   # a bf16-pair table and one bf16x2 multiply a byte (QLORA_SM90_BF16_PAIRS)
#                                        # (DIAG, PRODUCER, SLICED, CLUSTER, SETS and BF16_PAIRS combine, but
#                                        # BF16_PAIRS not with DIAG 1 or 2)
#     BUILD_ONLY=1 ...                   # build the binary and stop (e.g. in the background of other GPU work)
#     REUSE_BIN=1 ...                    # run the binary already built for these settings, if there is one
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
OUT="${OUT:-out}"
mkdir -p "$OUT"
DIAG="${DIAG:-0}"
# Each experiment's macro, and its suffix on the binary, the build log and the result
VARIANT_FLAGS=()
VARIANT=
if [ "$DIAG" != 0 ]; then VARIANT_FLAGS+=(-DQLORA_SM90_DIAG="$DIAG"); VARIANT+=_diag$DIAG; fi
if [ "${PRODUCER:-0}" = 1 ]; then VARIANT_FLAGS+=(-DQLORA_SM90_PRODUCER_WG=1); VARIANT+=_producer; fi
if [ "${SLICED:-0}" = 1 ]; then VARIANT_FLAGS+=(-DQLORA_SM90_SLICED=1); VARIANT+=_sliced; fi
if [ "${CLUSTER:-1}" != 1 ]; then VARIANT_FLAGS+=(-DQLORA_SM90_CLUSTER_N="$CLUSTER"); VARIANT+=_cluster$CLUSTER; fi
if [ "${SETS:-2}" != 2 ]; then VARIANT_FLAGS+=(-DQLORA_SM90_SETS="$SETS"); VARIANT+=_sets$SETS; fi
if [ "${BF16_PAIRS:-0}" = 1 ]; then VARIANT_FLAGS+=(-DQLORA_SM90_BF16_PAIRS=1); VARIANT+=_bf16pairs; fi
BIN=/tmp/nf4_gemm_sm90_check$VARIANT
BUILD_LOG="$OUT/nf4_gemm_sm90_build$VARIANT.txt"
RESULT="$OUT/nf4_gemm_sm90${VARIANT:-_check}_${GPU_TAG:-h100}.json.txt"

# cuBLAS: nvcc's own toolkit when it has it; otherwise the nvidia-cublas wheel beside PyTorch, which ships only the
# versioned library (libcublas.so.13, no libcublas.so), hence -l: and an rpath. A tiny probe decides in seconds.
CUBLAS_FLAGS=(-lcublas)
probe=$(mktemp -d)
printf '#include <cublas_v2.h>\nint main() { cublasHandle_t h; return int(cublasCreate(&h)); }\n' >"$probe/probe.cu"
if ! nvcc -o "$probe/probe" "$probe/probe.cu" -lcublas >/dev/null 2>&1; then
  cublas_dir=$(python3 -c '
import glob, os, nvidia
for root in nvidia.__path__:
    for lib in sorted(glob.glob(os.path.join(root, "*", "lib", "libcublas.so.*"))):
        print(os.path.dirname(os.path.dirname(lib)), os.path.basename(lib)); raise SystemExit
' 2>/dev/null)
  if [ -z "$cublas_dir" ]; then
    echo "cuBLAS not found (neither nvcc's toolkit nor python3's nvidia wheels)" | tee "$BUILD_LOG"
    rm -rf "$probe"
    exit 2
  fi
  read -r cublas_root cublas_lib <<<"$cublas_dir"
  CUBLAS_FLAGS=(-I"$cublas_root/include" -L"$cublas_root/lib" "-l:$cublas_lib"
                -Xlinker -rpath -Xlinker "$cublas_root/lib")
  echo "cuBLAS from $cublas_root/lib/$cublas_lib"
fi
rm -rf "$probe"

if [ "${REUSE_BIN:-0}" = 1 ] && [ -x "$BIN" ]; then
  echo "reusing $BIN"
else
  echo "building $BIN (sm_90a; ptxas report in $BUILD_LOG)"
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DQLORA_SM90_WATCHDOG=1 "${VARIANT_FLAGS[@]}" -Icpp/include -Icpp/kernels/cuda -Xptxas -v \
    -o "$BIN" benchmarks/gpu_checks/nf4_gemm_sm90_check.cu "${CUBLAS_FLAGS[@]}" >"$BUILD_LOG" 2>&1
  build_status=$?
  # The kernel under test's entries only (the harness's own kernels live in an anonymous namespace, _GLOBAL__N_),
  # plus every warning or error: register count, spills and wgmma serialisation (C7513) are what matter here.
  awk '/Compiling entry function/ { show = ($0 !~ /_GLOBAL__N_/) }
       /warning|error/ { print; next }
       show && /nf4_gemm_sm90|registers|spill|stack frame/ { print }' "$BUILD_LOG"
  if [ $build_status -ne 0 ]; then
    echo "build failed ($build_status):"
    tail -30 "$BUILD_LOG"
    exit 2
  fi
fi
[ "${BUILD_ONLY:-0}" = 1 ] && exit 0

if [ "${SANITIZE:-0}" = 1 ]; then
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not on PATH"; exit 2; }
  # memcheck slows every kernel (cuBLAS' and the reference's too); the timings would mean nothing under it.
  timeout -k 10 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN" --check-only "$@" 2>&1 \
    | tee "$OUT/nf4_gemm_sm90_memcheck_${GPU_TAG:-h100}.txt"
  status=${PIPESTATUS[0]}
else
  # stderr too: its "# running ..." lines name the case a hang or a fault happened in.
  timeout -k 10 120 "$BIN" "$@" 2>&1 | tee "$RESULT"
  status=${PIPESTATUS[0]}
fi
case "$status" in
  124 | 137) echo "TIMEOUT: the program was killed (a hang, most likely a barrier wait that never completes)" ;;
esac
exit "$status"
