#!/usr/bin/env bash
# Every GPU check and measurement of the project, in stages that each fit one device call
# (< 10 minutes on the H100). Results and logs land in $OUT (default ./out); JSON named *_h100.json
# goes to benchmarks/results/ once reviewed.
#
#     bash benchmarks/gpu_checks/run.sh build tests        # build for sm_90, full pytest on the GPU, leak check
#     bash benchmarks/gpu_checks/run.sh build sanitize     # compute-sanitizer over the workload, then the pytest CUDA tests
#     bash benchmarks/gpu_checks/run.sh build sanitize_workload # the workload only (every kernel; minutes)
#     bash benchmarks/gpu_checks/run.sh build train        # 8B seq 2048 + 8192 and 1B: ours (offloaded checkpoints), ours_resident, Unsloth, bnb+PEFT
#     bash benchmarks/gpu_checks/run.sh build longest      # longest sequence under a 24 GiB cap (LONGEST_STACKS=ours, =unsloth)
#     bash benchmarks/gpu_checks/run.sh build kernels      # NF4 GEMV/GEMM, block ops, DoRA/LoRA family, PagedAdamW
#     bash benchmarks/gpu_checks/run.sh build decode       # generation: tokens/s of an 8B-shaped model
#     bash benchmarks/gpu_checks/run.sh build units        # fused MLP (LoRA, DoRA) / Q/K/V units: CUDA tests,
#                                                          # QDoRA vs QLoRA (8B, 1B), 1B training with/without fused Q/K/V
#     bash benchmarks/gpu_checks/run.sh build gemv_ab      # every nf4_gemv variant: CUDA tests + A/B benchmark
#     bash benchmarks/gpu_checks/run.sh build decode_profile # the kernels of a decode step (bf16, NF4 merged)
#     bash benchmarks/gpu_checks/run.sh build ncu_gemv     # Nsight Compute on the GEMV variants (M = 1)
#     bash benchmarks/gpu_checks/run.sh build ncu_stalls   # "factored" at M = 1: stall reasons, pipes, shared wavefronts
#     bash benchmarks/gpu_checks/run.sh build lean         # factored_lean(_wide): tests, A/B at M = 1 and 16, memcheck
#     bash benchmarks/gpu_checks/run.sh build gemv_sass    # "factored"'s stalls per SASS instruction, and its SASS
#     bash benchmarks/gpu_checks/run.sh build gemv_v16     # the 16-byte-load GEMV experiment (CuPy): check, A/B, ncu
#     bash benchmarks/gpu_checks/run.sh build ring         # the "ring" GEMV (M <= 4): tests, sanitizers, A/B
#     bash benchmarks/gpu_checks/run.sh build ring_decode  # why "ring" slows the 8B decode: with/without PDL, profile
#     bash benchmarks/gpu_checks/run.sh build ring_exp     # the CuPy ring against the library's ring, one process;
#                                                          # gemv_ring32 (M <= 16) against the default
#     bash benchmarks/gpu_checks/run.sh build auto_tests   # the "auto" variant's GEMV tests
#     bash benchmarks/gpu_checks/run.sh build auto_rings   # "auto" (ring M <= 4, ring32 5..16): tests, racecheck, A/B, decode
#     bash benchmarks/gpu_checks/run.sh build x_ahead      # ring32 with x one item ahead: tests, memcheck, A/B
#     bash benchmarks/gpu_checks/run.sh build gemv_scaling # M = 1 GEMV time against weight size: fixed cost vs stream rate
#     bash benchmarks/gpu_checks/run.sh gemm_sm90          # the Hopper NF4 GEMM's standalone check and M = 2048 timing
#     bash benchmarks/gpu_checks/run.sh gemm_sm90 ncu_gemm_sm90 # Nsight Compute on the Hopper NF4 GEMM at M = 2048
#     bash benchmarks/gpu_checks/run.sh gemm_sm90_diag     # its M = 2048 time without the dequantization / the table
#     bash benchmarks/gpu_checks/run.sh gemm_sm90_variants # its experiments (a producer warpgroup, sliced wgmma issue)
#     REUSE_BIN=1 bash benchmarks/gpu_checks/run.sh sm90_prebuild gemm_sm90 gemm_sm90_diag gemm_sm90_variants ncu_gemm_sm90
#                                                          # (the standalone binaries built beside the other stages)
#     bash benchmarks/gpu_checks/run.sh build ring_tables_first # the M = 1 ring with its tables ready before the weight
#     bash benchmarks/gpu_checks/run.sh build sm90_route   # nf4_gemm's Hopper kernel in the library: tests, memcheck,
#                                                          # the routes at M 65..2048 against dense and bf16 cuBLAS
#     bash benchmarks/gpu_checks/run.sh build timeline     # the CuPy ring's per-warp timeline at M = 1 (imports qlora_ext)
#     bash benchmarks/gpu_checks/run.sh build ring32       # variant "ring32" (M <= 16): tests, sanitizers, A/B
#     bash benchmarks/gpu_checks/run.sh build ring32_stages # ring32 around one tile a SM: tests, memcheck, A/B
#     bash benchmarks/gpu_checks/run.sh build carveout     # the shared-memory configuration of each GEMV kernel (ncu)
#     bash benchmarks/gpu_checks/run.sh build auto_default # every CUDA test with "auto" selected, decode auto vs factored_fill
#     bash benchmarks/gpu_checks/run.sh build fixes_s22    # session 22's fixes of three CUDA tests (no GPU then)
#     bash benchmarks/gpu_checks/run.sh build wide_ab      # the 64 KB-table GEMV and the grouped GEMV: tests, A/B,
#                                                          # decode, decode profile
#     bash benchmarks/gpu_checks/run.sh build wide_checks  # then: nf4_gemm timed, ncu, sanitizers
#     bash benchmarks/gpu_checks/run.sh build decode_fused # rope_append_kv_ and the additive SDPA mask: tests,
#                                                          # sanitizers, decode with each off, decode profile
#     bash benchmarks/gpu_checks/run.sh build decode_next  # decode tests, decode grouped on/off, decode profile
#     bash benchmarks/gpu_checks/run.sh build dora_new     # DoRA's newest CUDA paths: tests, and sanitizers on the new op
#     bash benchmarks/gpu_checks/run.sh build dora_ab      # DoRA's kernels alone, then QLoRA vs QDoRA as is and
#                                                          # without parts of the defaults, interleaved, 8B and 1B
#     bash benchmarks/gpu_checks/run.sh build family       # every LoRA-family variant vs QLoRA, 8B and 1B, interleaved
#     bash benchmarks/gpu_checks/run.sh build train_ab     # 8B: the defaults vs what they replaced, and Unsloth
#     bash benchmarks/gpu_checks/run.sh build decode_ab    # decode with the "factored" GEMV vs "mma"
#     bash benchmarks/gpu_checks/run.sh build sanitize_variants # racecheck of fused Q/K/V, workload with every
#                                                          # GEMV variant under all three tools, DoRA tests
#     bash benchmarks/gpu_checks/run.sh build attn_ab      # SDPA backends for training, the NF4 read floor,
#                                                          # 8B training with cuDNN attention first vs default, Unsloth
#     bash benchmarks/gpu_checks/run.sh build replay       # attention half kept vs recomputed: CUDA tests, 8B A/B + Unsloth
#     bash benchmarks/gpu_checks/run.sh build gaps         # where an 8B step (2048, 8192) leaves the GPU idle, and why
#     bash benchmarks/gpu_checks/run.sh build s19          # K-extended gate/up (rows dequantize): CUDA tests, memcheck,
#                                                          # 8B A/B with the former two GEMMs and Unsloth
#     bash benchmarks/gpu_checks/run.sh build s20          # 8B (2048, 8192) and 1B vs Unsloth, same run
#     bash benchmarks/gpu_checks/run.sh build rounds_2048  # 8B 2048: ours, ours_s19, Unsloth in 3 alternating rounds
#     bash benchmarks/gpu_checks/run.sh build train_final_8b  # 8B training vs Unsloth (2048, 8192), kernel time
#     bash benchmarks/gpu_checks/run.sh train_final_rest      # 1B vs Unsloth, decode of every stack (bnb too)
#                                                           # (two calls: together they exceed one call's 600 s)
#     bash benchmarks/gpu_checks/run.sh build sanitize_rest # racecheck of the GEMV variant tests, every
#                                                          # report printed and attributed to its kernel
#
# Peers (bitsandbytes, Unsloth) come from .peers/peers.tar.xz (shared/tools/peer-bundle.sh),
# carried to the machine with the repo. With BUNDLE=1 the logs and JSON go to one archive,
# $OUT/gpu_logs.tgz (the device tool brings back at most 8 files per call).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-out}"
if [ "${BUNDLE:-0}" = 1 ]; then
  BUNDLE_DIR="$OUT"
  OUT=/tmp/qlora-gpu-logs
  trap 'tar -C "$OUT" -czf "$BUNDLE_DIR/gpu_logs.tgz" .' EXIT
fi
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# Result files carry the card in their names (…_h100.json, …_h200.json): from GPU_TAG if set, else from the first
# GPU's name, so that a call that lands on an H200 does not write files named for the H100.
if [ -z "${GPU_TAG:-}" ]; then
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" in
    *H200*) export GPU_TAG=h200 ;;
    *H100*) export GPU_TAG=h100 ;;
  esac
fi
echo "== result files tagged ${GPU_TAG:-h100}"
status=0

step() {  # name, command...: runs it, logs to $OUT/<name>.log, prints the tail, remembers failures
  local name=$1; shift
  local start=$SECONDS
  if declare -F "$1" >/dev/null; then "$@"; else timeout "${STEP_TIMEOUT:-900}" "$@"; fi > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - start)) s"
  tail -n "${TAIL:-12}" "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

build() {
  export QLORA_CUDA_ARCHITECTURES="${QLORA_CUDA_ARCHITECTURES:-90}"
  if [ -f .peers/peers.tar.xz ] && [ ! -d /tmp/peers ]; then
    mkdir -p /tmp/peers && tar -C /tmp/peers -xJf .peers/peers.tar.xz
  fi
  rm -rf /tmp/qlora-gpu-install
  "$PY" -m pip install -q --no-build-isolation --no-deps -C build-dir=build/gpu --target /tmp/qlora-gpu-install . &&
    cp /tmp/qlora-gpu-install/qlora_ext/_C*.so python/qlora_ext/
}

# One run of nf4_gemm_sm90_check.sh with a variant's settings (KEY=VALUE,KEY=VALUE: its build macros) exported for
# it alone; then tail lines of its log; then the script's arguments.
sm90_variant_step() {
  local variant=$1 tail=$2 settings setting
  shift 2
  settings=${variant//,/ }
  export $settings  # (step is a function: env cannot run it)
  TAIL=$tail step "gemm_sm90_$(echo "$variant" | tr -d = | tr , _)" bash benchmarks/gpu_checks/nf4_gemm_sm90_check.sh "$@"
  for setting in $settings; do unset "${setting%%=*}"; done
}

racecheck_parts() {  # pytest -k of sanitize_tests.sh's parts (RUNS "tool file N" takes K_N)
  export K_1='cuda-mma' K_2='cuda-factored_split' K_3='cuda-factored_r2' K_4='cuda-factored_r1' \
    K_5='factored and not factored_' K_6='not mma and not factored' K_7='into' K_8='swiglu_scaled' \
    K_9='(column_scale or dora_scale) and cuda'
}

for stage in "$@"; do
  export PYTHONPATH="$ROOT/python:/tmp/peers"
  case "$stage" in
    build)
      step build build
      "$PY" -c "import qlora_ext, torch; print(qlora_ext.build_info(), torch.__version__, torch.cuda.get_device_name())"
      ;;
    tests)
      step pytest "$PY" -m pytest tests -n 12 -q -p no:cacheprovider -rfE
      step leak "$PY" benchmarks/leak_check.py --out "$OUT/leak_h100.json"
      ;;
    sanitize|sanitize_workload)
      # The workload (every qlora kernel, seconds of GPU time) under the three tools, twice: the
      # second time with dora_scale's former kernel (QLORA_DORA_SCALE_KERNEL=rows); then, for
      # "sanitize", the pytest CUDA suite too (sanitize_tests.sh: calls' worth of time)
      step sanitize_workload bash -c "for k in registers rows; do for t in memcheck racecheck initcheck; do QLORA_DORA_SCALE_KERNEL=\$k compute-sanitizer --tool \$t --error-exitcode 9 $PY benchmarks/sanitize_workload.py 2>&1 | tail -2; done; done"
      [ "$stage" = sanitize ] && step sanitize_tests bash benchmarks/gpu_checks/sanitize_tests.sh "$OUT/sanitizer_tests_h100.txt"
      ;;
    train)
      step train_8b "$PY" benchmarks/bench_train.py --model 8b --seq 2048 8192 --steps 8 \
        --stacks ours,ours_resident,unsloth,bnb_peft --out "$OUT/train_8b_h100.json"
      step train_1b "$PY" benchmarks/bench_train.py --model 1b --seq 2048 --steps 10 \
        --stacks ours,unsloth --out "$OUT/train_1b_h100.json"
      ;;
    longest)
      # 2 steps per length (the first allocates the optimizer state; the peak is reached by the
      # second), each stack stopping at its first length that fails; one stack per device call.
      # 2026-12-06 (H100): ours 114,688 at 20.3 GiB (37.6 s a step; 131,072 would take ~45 s),
      # Unsloth 49,152 at 19.2 GiB, out of memory at 65,536 (57,344 not finished in the call).
      LONGEST_STACKS="${LONGEST_STACKS:-ours}"
      case "$LONGEST_STACKS" in
        unsloth) default_seqs="49152 57344 65536" ;;
        *) default_seqs="114688 131072 147456" ;;
      esac
      STEP_TIMEOUT=570 step longest "$PY" benchmarks/bench_train.py --model 8b --cap-gib 24 --steps 2 --child-timeout 240 \
        --stacks "$LONGEST_STACKS" --seq ${LONGEST_SEQS:-$default_seqs} \
        --out "$OUT/train_8b_longest_24gib_${LONGEST_STACKS//,/_}_h100.json"
      ;;
    kernels)
      for extra in bench_nf4_gemm bench_block_ops; do
        [ -f "benchmarks/$extra.py" ] && step "$extra" "$PY" "benchmarks/$extra.py" --out "$OUT/${extra#bench_}_h100.json"
      done
      step nf4_linear "$PY" benchmarks/bench_nf4_linear.py --out "$OUT/nf4_linear_h100.json"
      step lora_family "$PY" benchmarks/bench_lora_family.py --shapes 1b,8b --cases lora,dora \
        --out "$OUT/lora_family_dora_1b_8b_h100.json"
      ;;
    decode)
      [ -f benchmarks/bench_decode.py ] && step decode "$PY" benchmarks/bench_decode.py --out "$OUT/decode_8b_h100.json"
      ;;
    units)
      step units_tests "$PY" -m pytest -n 14 -q -p no:cacheprovider -rfE tests/test_fused_mlp.py tests/test_fused_qkv.py \
        tests/test_checkpointing.py tests/test_lora_family.py tests/test_fused_path.py tests/test_fused_loss.py
      step lora_family_units "$PY" benchmarks/bench_lora_family.py --shapes 8b,1b --cases lora,dora \
        --out "$OUT/lora_family_dora_units_h100.json"
      step train_qkv "$PY" benchmarks/bench_train.py --model 1b --seq 2048 --steps 10 --stacks ours,ours_qkv_off,ours_qkv_three_gemms,unsloth \
        --out "$OUT/train_1b_qkv_h100.json"
      ;;
    wide_ab)
      # The GEMV with the 64 KB table ("factored_wide") and the grouped GEMV (q/k/v, gate/up in one
      # launch), 2026-12-06: the GEMV/GEMM CUDA tests, the kernel A/B against "factored", the
      # grouped op's and its users' tests, grouped vs separate launches, decode with each variant as
      # the process default and with grouping off, and where a decode step's time goes
      step gemv_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_nf4_gemv.py tests/test_nf4_gemm.py -k "cuda or variant"
      step gemv_wide_ab "$PY" benchmarks/bench_nf4_linear.py --variants factored,factored_wide --m 1 8 16 \
        --shapes 4096x4096,1024x4096,14336x4096,4096x14336,28672x8192 --out "$OUT/nf4_gemv_wide_h100.json"
      step gemv_grouped_tests "$PY" -m pytest -n 8 -q -p no:cacheprovider -rfE tests/test_nf4_gemv_grouped.py \
        tests/test_project_together.py tests/test_generate.py tests/test_fused_qkv.py tests/test_block_ops.py
      step gemv_grouped "$PY" benchmarks/bench_nf4_gemv_grouped.py --m 1 4 16 --out "$OUT/nf4_gemv_grouped_h100.json"
      step decode "$PY" benchmarks/bench_decode.py --stacks bf16,nf4_merged --gemv-variants factored_wide,factored \
        --grouped-ab --repeats 2 --out "$OUT/decode_8b_wide_h100.json"
      TAIL=40 step decode_profile "$PY" benchmarks/profile_decode.py --layers 8 --steps 8
      ;;
    decode_next)
      # decode after the grouped GEMV and the one-query grouped attention (2026-12-06): the tests
      # that reach them, the GEMV at 3 and 4 CTAs a SM ("factored_o3/_o4") against "factored",
      # decode with grouping on and off and per variant, where a decode step's time goes
      step decode_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_project_together.py \
        tests/test_generate.py tests/test_nf4_gemv.py tests/test_nf4_gemm.py tests/test_nf4_gemv_grouped.py
      step gemv_occupancy_ab "$PY" benchmarks/bench_nf4_linear.py --variants factored,factored_o3,factored_o4 --m 1 8 \
        --shapes 4096x4096,1024x4096,14336x4096,4096x14336,28672x8192 --out "$OUT/nf4_gemv_occupancy_h100.json"
      step decode "$PY" benchmarks/bench_decode.py --stacks bf16,nf4_merged --grouped-ab --repeats 2 \
        --gemv-variants factored,factored_o3,factored_o4 --out "$OUT/decode_8b_grouped_h100.json"
      TAIL=40 step decode_profile "$PY" benchmarks/profile_decode.py --layers 8 --steps 8 --stacks nf4_merged
      ;;
    decode_lean)
      # decode_next in ~2.5 minutes (for a short device budget): the CUDA tests of the occupancy
      # variants and of project_together, the variants on three shapes, decode once per stack
      step decode_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_project_together.py \
        tests/test_nf4_gemv.py tests/test_nf4_gemv_grouped.py -k "factored_o3 or factored_o4 or test_project_together"
      step gemv_occupancy_ab "$PY" benchmarks/bench_nf4_linear.py --variants factored,factored_o3,factored_o4 --m 1 \
        --shapes 4096x4096,14336x4096,28672x8192 --out "$OUT/nf4_gemv_occupancy_h100.json"
      step decode "$PY" benchmarks/bench_decode.py --stacks bf16,nf4_merged --grouped-ab --repeats 1 \
        --gemv-variants factored,factored_o3,factored_o4 --out "$OUT/decode_8b_grouped_h100.json"
      ;;
    decode_fused)
      # decode with one launch for the rope and the KV-cache write (rope_append_kv_), an additive
      # SDPA mask built once a step, programmatic dependent launch, the residual adds in the GEMVs
      # and decode_attention (2026-12-06): the CUDA tests that reach them, memcheck and racecheck of
      # the new kernels and of a PDL chain, decode with each off in turn, where a step's time goes
      step decode_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_rope_append_kv.py tests/test_decode_attention.py \
        tests/test_programmatic_launch.py tests/test_generate.py tests/test_project_together.py tests/test_block_ops.py \
        tests/test_nf4_gemv.py tests/test_nf4_gemv_grouped.py tests/test_fused_mlp.py tests/test_fused_qkv.py \
        -k "cuda or CUDA or generate or graph or residual or project_add"
      RUNS=$'memcheck tests/test_rope_append_kv.py 1\nracecheck tests/test_rope_append_kv.py 2\nmemcheck tests/test_programmatic_launch.py 3\nracecheck tests/test_programmatic_launch.py 4\nmemcheck tests/test_decode_attention.py 5\nracecheck tests/test_decode_attention.py 6' \
        K_1='cuda and not fused_attention' K_2='cuda and (matches or replays)' K_3='chain' K_4='chain' \
        K_5='cuda and not fused_attention' K_6='cuda and (bfloat16 or graph or never_read) and not fused_attention' KERNELS=qlora \
        STEP_TIMEOUT=150 step sanitize_decode bash benchmarks/gpu_checks/sanitize_tests.sh "$OUT/sanitizer_decode_h100.txt" 6
      step decode "$PY" benchmarks/bench_decode.py --stacks bf16,nf4_merged --fusion-ab --repeats 2 \
        --out "$OUT/decode_8b_fused_h100.json"
      TAIL=40 step decode_profile "$PY" benchmarks/profile_decode.py --layers 8 --steps 8 --stacks nf4_merged
      ;;
    glu)
      # SwiGLU in the gate/up GEMV's epilogue (nf4_gemv_swiglu) and decode_attention's staged kernels: CUDA
      # tests, the op timed against grouped + swiglu (and q/k/v's grouped launch at 3 CTAs a SM), decode with
      # it off and with decode_attention's kernels on, the sanitizers on both, the step's kernels
      step glu_tests "$PY" -m pytest -n 14 -q -p no:cacheprovider -rfE tests/test_nf4_gemv_swiglu.py \
        tests/test_project_together.py tests/test_decode_attention.py tests/test_generate.py tests/test_fused_mlp.py \
        tests/test_nf4_gemv_grouped.py -k "cuda or CUDA or graph or residual or project or fused"
      step decode "$PY" benchmarks/bench_decode.py --stacks bf16,nf4_merged --fusion-ab --newest-only --repeats 2 \
        --gemv-variants factored_fill,factored --out "$OUT/decode_8b_glu_h100.json"
      step grouped "$PY" benchmarks/bench_nf4_gemv_grouped.py --m 1 4 --variants factored,factored_o3,factored_fill \
        --out "$OUT/nf4_gemv_swiglu_h100.json"
      step fill_tests "$PY" -m pytest -n 14 -q -p no:cacheprovider -rfE tests/test_nf4_gemv.py -k "factored_fill"
      RUNS=$'memcheck tests/test_nf4_gemv_swiglu.py 1\nracecheck tests/test_nf4_gemv_swiglu.py 2\nmemcheck tests/test_decode_attention.py 3\nracecheck tests/test_decode_attention.py 4' \
        K_1='cuda' K_2='cuda and (bfloat16 or scale_forms or variant) and (-1- or -9- or scale_forms or variant)' \
        K_3='cuda and not fused_attention' K_4='cuda and (bfloat16 or graph or never_read) and not fused_attention' \
        KERNELS=qlora STEP_TIMEOUT=100 step sanitize_glu bash benchmarks/gpu_checks/sanitize_tests.sh "$OUT/sanitizer_glu_h100.txt" 4
      TAIL=30 step decode_profile "$PY" benchmarks/profile_decode.py --layers 8 --steps 8 --stacks nf4_merged
      ;;
    attn_ab)
      # session 16 (2026-12-06): which SDPA backend training should attend with (bench_attention_backends),
      # the SDPA_PRIORITY switch's CUDA tests, the NF4 read floor under the GEMV bars (bench_read_floor),
      # then 8B training with cuDNN attention first against the default and Unsloth (needs BUNDLE's peers)
      step attention_backends "$PY" benchmarks/bench_attention_backends.py --seq 2048 8192 \
        --out "$OUT/attention_backends_${GPU_TAG:-h100}.json"
      step sdpa_tests "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_fused_path.py -k sdpa
      step read_floor "$PY" benchmarks/bench_read_floor.py --out "$OUT/read_floor_${GPU_TAG:-h100}.json"
      STEP_TIMEOUT="${TRAIN_TIMEOUT:-420}" step train_sdpa "$PY" benchmarks/bench_train.py --model 8b --seq 2048 8192 --steps 8 \
        --stacks "${TRAIN_STACKS:-ours_sdpa_cudnn,ours,unsloth}" --out "$OUT/train_8b_sdpa_${GPU_TAG:-h100}.json"
      ;;
    grad_tests)
      # session 17: adapter gradients by aten::mm.dtype (lora_linear.mm_as) and the units that use it, on CUDA
      STEP_TIMEOUT=150 step grad_tests "$PY" -m pytest -n 14 -q -p no:cacheprovider -rfE tests/test_lora_linear.py \
        tests/test_fused_qkv.py tests/test_lora_family.py tests/test_fused_mlp.py -k "cuda or mm_as or fp32_on_every"
      ;;
    replay)
      # session 18: the attention half kept in host memory instead of recomputed (attention_replay.py)
      STEP_TIMEOUT=150 step replay_tests "$PY" -m pytest -n 8 -q -p no:cacheprovider -rfE tests/test_attention_replay.py \
        tests/test_checkpointing.py tests/test_fused_qkv.py tests/test_lora_linear.py -k "cuda or replay"
      STEP_TIMEOUT=420 step train_replay "$PY" benchmarks/bench_train.py --model 8b --seq 2048 8192 --steps "${TRAIN_STEPS:-8}" ${KERNEL_TIME---kernel-time} \
        --stacks "${TRAIN_STACKS:-ours,ours_no_replay,unsloth}" --out "$OUT/train_8b_replay_${GPU_TAG:-h100}.json"
      ;;
    s19)
      # session 19: dequantize into rows (K-extended gate/up GEMMs), the replay's rope/add skips, the
      # scale-one and materialize launch cuts: CUDA tests, memcheck of the row kernel, 8B A/B + Unsloth
      STEP_TIMEOUT=200 step s19_tests "$PY" -m pytest -n 8 -q -p no:cacheprovider -rfE tests/test_nf4_ops.py \
        tests/test_fused_mlp.py tests/test_attention_replay.py tests/test_block_ops.py tests/test_lora_linear.py \
        tests/test_fused_qkv.py tests/test_checkpointing.py -k "cuda and (dequantize_into or fused_mlp or k_extended or replay or rms_norm or rope or reference or mm_as or unit or offload)"
      STEP_TIMEOUT=120 step s19_memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_nf4_ops.py -k "cuda and rows_of_a_wider"
      STEP_TIMEOUT=420 step train_s19 "$PY" benchmarks/bench_train.py --model 8b --seq 2048 8192 --steps "${TRAIN_STEPS:-6}" ${KERNEL_TIME-} \
        --stacks "${TRAIN_STACKS:-ours_two_gemm_gate_up,ours,unsloth}" --out "$OUT/train_8b_s19_${GPU_TAG:-h100}.json"
      ;;
    s20)
      # session 20: the recomputation's kept adapter casts (CUDA tests), then the bars' same-run
      # comparisons on a normal host (session 19's host was slow): 8B at 2048 and 8192 with session
      # 19's backward (ours_s19: casts made again, tuples fetched tensor by tensor), then 1B, against Unsloth
      STEP_TIMEOUT=200 step s20_tests "$PY" -m pytest -n 8 -q -p no:cacheprovider -rfE tests/test_checkpointing.py \
        tests/test_attention_replay.py tests/test_fused_qkv.py tests/test_fused_mlp.py tests/test_lora_linear.py -k "cuda"
      STEP_TIMEOUT=400 step train_8b_s20 "$PY" benchmarks/bench_train.py --model 8b --seq 2048 8192 --steps "${TRAIN_STEPS:-6}" ${KERNEL_TIME-} \
        --stacks "${TRAIN_STACKS:-ours_s19,ours,unsloth}" --out "$OUT/train_8b_s20_${GPU_TAG:-h100}.json"
      STEP_TIMEOUT=150 step train_1b_s20 "$PY" benchmarks/bench_train.py --model 1b --seq 2048 --steps 10 \
        --stacks ours,unsloth --out "$OUT/train_1b_s20_${GPU_TAG:-h100}.json"
      ;;
    s20_short)
      # s20 for a short budget: the CUDA tests of its changes, then 8B at 2048 only
      STEP_TIMEOUT=150 step s20_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_checkpointing.py \
        tests/test_attention_replay.py tests/test_fused_qkv.py tests/test_fused_mlp.py \
        -k "cuda and (casts or tuple or offload or replay or joint or k_extended or unit or bf16)"
      STEP_TIMEOUT=240 step train_8b_s20 "$PY" benchmarks/bench_train.py --model 8b --seq 2048 --steps 6 \
        --stacks "${TRAIN_STACKS:-ours,unsloth,ours_s19}" --out "$OUT/train_8b_2048_s20_${GPU_TAG:-h100}.json"
      ;;
    rounds_2048)
      # an A/B on a noisy host: 8B at 2048, the stacks in 3 alternating rounds, ratios within rounds
      # (session 20: ours ranged 8,460-10,930 tok/s within minutes on one machine)
      STEP_TIMEOUT=560 step train_8b_rounds "$PY" benchmarks/bench_train.py --model 8b --seq 2048 --steps 6 --rounds 3 \
        --stacks "${TRAIN_STACKS:-ours,ours_s19,unsloth}" --out "$OUT/train_8b_2048_rounds_${GPU_TAG:-h100}.json"
      ;;
    gaps)
      # session 18: where the 8B step leaves the GPU idle (host-bound stretches, synchronisations)
      for seq in ${GAP_SEQS:-2048 8192}; do
        STEP_TIMEOUT=200 step "gaps_$seq" "$PY" benchmarks/profile_step_gaps.py --model 8b --seq "$seq" --stack "${GAP_STACK:-ours}" \
          --out "$OUT/step_gaps_8b_${seq}_${GPU_TAG:-h100}.json"
      done
      ;;
    train_final_8b)
      # the bars' same-run comparisons on the bar's card, 8B half: ours against Unsloth with summed kernel time
      STEP_TIMEOUT=300 step train_8b "$PY" benchmarks/bench_train.py --model 8b --seq 2048 8192 --steps 8 --kernel-time \
        --stacks ours,unsloth --out "$OUT/train_8b_final_${GPU_TAG:-h100}.json"
      ;;
    train_final_rest)
      STEP_TIMEOUT=150 step train_1b "$PY" benchmarks/bench_train.py --model 1b --seq 2048 --steps 10 \
        --stacks ours,unsloth --out "$OUT/train_1b_final_${GPU_TAG:-h100}.json"
      STEP_TIMEOUT=200 step decode "$PY" benchmarks/bench_decode.py --repeats 2 --out "$OUT/decode_8b_all_${GPU_TAG:-h100}.json"
      ;;
    glu_final)
      # after glu (H200): decode on the H100 (the bar's card), racecheck of nf4_gemv_swiglu's tests that call
      # no cuBLAS (under racecheck the H200's cuBLAS bf16 GEMM hit "Sanitizer failed to handle a hardware
      # exception"), the default variant factored_fill's tests
      step decode "$PY" benchmarks/bench_decode.py --stacks bf16,nf4_merged --repeats 2 --out "$OUT/decode_8b_glu_h100.json"
      RUNS=$'racecheck tests/test_nf4_gemv_swiglu.py 1' K_1='cuda and (scale_forms or variant or empty or nan)' \
        KERNELS=qlora STEP_TIMEOUT=100 step sanitize_glu bash benchmarks/gpu_checks/sanitize_tests.sh "$OUT/sanitizer_glu_racecheck_h100.txt" 1
      step fill_tests "$PY" -m pytest -n 14 -q -p no:cacheprovider -rfE tests/test_nf4_gemv.py tests/test_nf4_gemv_grouped.py \
        tests/test_project_together.py -k "variant_switch or fill or (cuda and part_by_part) or logits or generate_tokens"
      ;;
    decode_final)
      # decode_fused's checks in priority order for a short budget: the CUDA tests, decode with the
      # newest two shortcuts off in turn, the sanitizers on the new kernels, the step's kernels
      step decode_tests "$PY" -m pytest -n 14 -q -p no:cacheprovider -rfE tests/test_decode_attention.py \
        tests/test_programmatic_launch.py tests/test_project_together.py tests/test_rope_append_kv.py tests/test_generate.py \
        -k "cuda or CUDA or graph or residual or project_add or argmax or fused_attention"
      step decode "$PY" benchmarks/bench_decode.py --stacks bf16,nf4_merged --fusion-ab --newest-only --decode-attention-kernel --repeats 2 \
        --out "$OUT/decode_8b_final_h100.json"
      RUNS=$'memcheck tests/test_decode_attention.py 1\nracecheck tests/test_decode_attention.py 2\nmemcheck tests/test_programmatic_launch.py 3' \
        K_1='cuda and not fused_attention' K_2='cuda and (bfloat16 or graph or never_read) and not fused_attention' K_3='chain' \
        KERNELS=qlora STEP_TIMEOUT=100 step sanitize_decode bash benchmarks/gpu_checks/sanitize_tests.sh "$OUT/sanitizer_decode_h100.txt" 3
      TAIL=30 step decode_profile "$PY" benchmarks/profile_decode.py --layers 8 --steps 8 --stacks nf4_merged --decode-attention-kernel
      ;;
    wide_checks)
      # the second call of wide_ab's work: nf4_gemm timed, Nsight Compute, the sanitizers on the
      # 64 KB-table variant's tests and on the grouped GEMV's
      step nf4_gemm "$PY" benchmarks/bench_nf4_gemm.py --m 16 17 32 64 128 256 --out "$OUT/nf4_gemm_h100.json"
      for v in factored factored_wide; do
        VARIANTS=$v SHAPES=28672x8192 STEP_TIMEOUT=90 TAIL=4 step "ncu_$v" ncu --kernel-name regex:nf4_gemv --launch-skip 1 \
          --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
          --section Occupancy --section SchedulerStats --section LaunchStats "$PY" benchmarks/gpu_checks/ncu_gemv.py
      done
      RUNS=$'memcheck tests/test_nf4_gemv.py 1\nracecheck tests/test_nf4_gemv.py 2\ninitcheck tests/test_nf4_gemv.py 3\nmemcheck tests/test_nf4_gemv_grouped.py 4\nracecheck tests/test_nf4_gemv_grouped.py 5' \
        K_4='cuda' K_5='cuda and (bfloat16 or scale_forms) and (M1 or M16 or scale_forms)' \
        K_1='cuda-factored_wide and (bfloat16 or many_tiles or block_sizes or misaligned or deterministic)' \
        K_2='cuda-factored_wide and (many_tiles or deterministic or misaligned)' \
        K_3='cuda-factored_wide and bfloat16 and (300x3072 or 37x1536 or 64x4096)' STEP_TIMEOUT="${SANITIZE_TIMEOUT:-200}" \
        step sanitize_wide bash benchmarks/gpu_checks/sanitize_tests.sh "$OUT/sanitizer_tests_wide_h100.txt" 3
      ;;
    ncu_gemv)
      # Nsight Compute on one launch of "factored", "factored_wide" and the ring (the second of each case) at
      # 28672x8192, M = 1: throughput against the roofline, memory, warp stalls, occupancy
      # (SHAPES=...,4096x4096 for the latency-bound small shape too)
      for v in factored factored_wide ring; do
        for shape in ${NCU_SHAPES:-28672x8192}; do
          VARIANTS=$v SHAPES=$shape STEP_TIMEOUT=90 TAIL=4 step "ncu_${v}_$shape" ncu --kernel-name regex:nf4_gemv --launch-skip 1 \
            --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
            --section Occupancy --section SchedulerStats "$PY" benchmarks/gpu_checks/ncu_gemv.py
        done
      done
      ;;
    ncu_stalls)
      # session 21: why "factored" runs at ~1.7x the time of its own access pattern (bench_read_floor.py
      # --patterns): warp stall reasons by kind and by source line, the pipes' load, shared-memory
      # wavefronts and bank conflicts, at M = 1 on the largest and the smallest shape
      for shape in ${NCU_SHAPES:-28672x8192 4096x4096}; do
        VARIANTS=${NCU_VARIANT:-factored} SHAPES=$shape STEP_TIMEOUT=150 TAIL=2 step "ncu_stalls_$shape" ncu --kernel-name regex:nf4_gemv \
          --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
          --section InstructionStats --section SourceCounters --section SchedulerStats \
          --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio "$PY" benchmarks/gpu_checks/ncu_gemv.py
        VARIANTS=${NCU_VARIANT:-factored} SHAPES=$shape STEP_TIMEOUT=90 TAIL=2 step "ncu_pipes_$shape" ncu --kernel-name regex:nf4_gemv \
          --launch-skip 1 --launch-count 1 --metrics l1tex__data_pipe_lsu_wavefronts.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,\
l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,sm__inst_executed_pipe_lsu.sum,sm__inst_executed.sum,smsp__inst_executed_op_shared_ld.sum,\
smsp__inst_executed_op_global_ld.sum,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,\
l1tex__throughput.avg.pct_of_peak_sustained_active,sm__cycles_elapsed.avg "$PY" benchmarks/gpu_checks/ncu_gemv.py
      done
      ;;
    decode_profile)
      TAIL=70 step decode_profile "$PY" benchmarks/profile_decode.py --layers 8 --steps 8
      ;;
    gemv_v16)
      # session 21's prepared experiment (not yet run): the GEMV with 16-byte code loads and the two
      # blocks of a half-step in the MMA's column pairs (CuPy-compiled; checked against the reference,
      # then timed against the library's nf4_gemv and bf16 cuBLAS), and its L1 wavefronts under ncu
      STEP_TIMEOUT=200 step gemv_v16 "$PY" benchmarks/gpu_checks/gemv_v16_experiment.py --out "$OUT/gemv_v16_${GPU_TAG:-h100}.json"
      STEP_TIMEOUT=150 TAIL=30 step gemv_v16_ncu ncu --kernel-name regex:"gemv_v16|nf4_gemv" --launch-skip 8 --launch-count 2 \
        --metrics l1tex__data_pipe_lsu_wavefronts.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,sm__inst_executed.sum,\
l1tex__throughput.avg.pct_of_peak_sustained_active,gpu__time_duration.sum "$PY" benchmarks/gpu_checks/gemv_v16_experiment.py --m 1
      ;;
    ring)
      # session 22: the "ring" GEMV variant (M <= 4, per-warp cp.async rings, 16-byte code runs): the GEMV tests of every variant, memcheck and racecheck on the ring's cases, then the
      # A/B against factored_fill and bf16 cuBLAS at M = 1, 4, 16 (M = 16: factored_fill either way)
      STEP_TIMEOUT=240 step ring_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_nf4_gemv.py \
        tests/test_nf4_gemv_grouped.py tests/test_nf4_gemv_swiglu.py
      STEP_TIMEOUT=150 step ring_memcheck compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest -q \
        -p no:cacheprovider -m "not not_under_sanitizer" tests/test_nf4_gemv.py \
        -k "cuda-ring and (matches_reference and bfloat16 or many_tiles or block_sizes) or ring_large"
      STEP_TIMEOUT=150 step ring_racecheck compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" -m pytest -q \
        -p no:cacheprovider -m "not not_under_sanitizer" tests/test_nf4_gemv.py \
        -k "cuda-ring and matches_reference and bfloat16 and (17x256 or 50x768 or 64x4096 or 300x3072)"
      STEP_TIMEOUT=150 step ring_ab "$PY" benchmarks/bench_nf4_linear.py --variants ring,factored_fill \
        --m 1 4 16 --out "$OUT/nf4_gemv_ring_${GPU_TAG:-h100}.json"
      ;;
    ring_exp)
      # session 22's prepared CuPy kernels, run in session 23 (gemv_ring_exp_h100.json): the balanced ring
      # (gemv_ring_sk) and the column-group ring for M <= 16 (gemv_ring_mc) were slower and are gone;
      # the CuPy ring against the library's ring in one process (session 23's SASS:
      # 469 instructions an item in the library's <3, 2> loop against the CuPy ring3's 461; session 24 ran
      # it with gemv_ring_p and gemv_ring_g, since dropped: gemv_ring_exp_s24_h100.json)
      QLORA_NF4_GEMV_VARIANT=ring STEP_TIMEOUT=150 step ring_exp "$PY" benchmarks/gpu_checks/gemv_v16_experiment.py \
        --variants ring3 ring2_c3 --m 1 4 --out "$OUT/gemv_ring_exp_${GPU_TAG:-h100}.json"
      # session 23's gemv_ring32 (M <= 16, 32-row tiles; docs/nf4_gemv_m16.md) against the library's default;
      # session 24's r32_t2 / r32_t4 (2 / 4 tiles a CTA round, x shared through L1), not yet run
      STEP_TIMEOUT=150 step ring32_exp "$PY" benchmarks/gpu_checks/gemv_v16_experiment.py \
        --variants r32_s2 r32_t2 r32_t4 --m 1 4 8 16 --out "$OUT/gemv_ring32_exp_${GPU_TAG:-h100}.json"
      # session 24: the fixed cost of an M = 1 call (a graph node's floor, each variant with PDL off and on,
      # bf16 cuBLAS), for the 3x bar at the small shapes
      STEP_TIMEOUT=120 TAIL=14 step gemv_floor "$PY" benchmarks/gpu_checks/gemv_floor.py --out "$OUT/gemv_floor_${GPU_TAG:-h100}.json"
      # the 80% criterion under ncu: DRAM bytes / duration of the ring and factored_fill against a 1 GiB copy
      STEP_TIMEOUT=90 TAIL=60 step ncu_bandwidth ncu --profile-from-start off --metrics \
        dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum "$PY" benchmarks/gpu_checks/ncu_bandwidth.py
      ;;
    gemv_scaling)
      # session 26: the M = 1 GEMV ("auto") and bf16 cuBLAS against the weight's size, K = 4096 and 14336, with a
      # fixed + bytes / bandwidth fit each: is the small shapes' gap to the 3x bar a fixed cost or a streaming rate?
      STEP_TIMEOUT=200 TAIL=20 step gemv_scaling "$PY" benchmarks/gpu_checks/gemv_scaling.py \
        --out "$OUT/gemv_scaling_${GPU_TAG:-h100}.json"
      ;;
    gemm_sm90)
      wait  # for sm90_prebuild's builds, if it ran
      # session 27: the Hopper NF4 GEMM (cpp/kernels/cuda/nf4_gemm_sm90*.cuh), standalone: its checks against cuBLAS on
      # the dequantized weight, then M = 2048 against bf16 cuBLAS (no build needed; its own timeout inside)
      TAIL=40 step gemm_sm90 bash benchmarks/gpu_checks/nf4_gemm_sm90_check.sh
      ;;
    gemm_sm90_diag)
      wait  # for sm90_prebuild's builds, if it ran
      # session 28: where the Hopper NF4 GEMM's main loop spends its time: M = 2048 at the four shapes with the
      # dequantization skipped (DIAG=1), with the table lookup replaced by a conversion (DIAG=2), and (session 29) with
      # the whole dequantization done but not waited for (DIAG=3), beside the real kernel; timings only (the
      # diagnostic builds compute wrong results on purpose)
      for d in ${DIAGS:-0 1 2 3}; do
        DIAG=$d STEP_TIMEOUT=150 TAIL=6 step "gemm_sm90_diag$d" bash benchmarks/gpu_checks/nf4_gemm_sm90_check.sh --time-only
      done
      ;;
    gemm_sm90_variants)
      wait  # for sm90_prebuild's builds, if it ran
      # session 29's experiments on the Hopper NF4 GEMM, each checked then timed at M = 2048 (beside gemm_sm90 and
      # gemm_sm90_diag's numbers): a producer warpgroup issuing the copies (PRODUCER, setmaxnreg 40 / 232), each k16
      # slice's wgmma issued as soon as it is dequantized (SLICED), both, the producer with clusters of 2 and 4
      # sharing X by multicast (CLUSTER), three A-register sets (SETS: two stages of wgmmas in flight), alone and with
      # the producer; (session 30) a bf16-pair table with one bf16x2 multiply a byte (BF16_PAIRS), alone and with the
      # producer; then diagnostic builds of the producer: diag 1 alone and with clusters of 2
      # (no dequantization: their pipelines alone), diag 3 (the dequantization not waited for)
      for variant in ${SM90_VARIANTS:-PRODUCER=1 SLICED=1 PRODUCER=1,SLICED=1 PRODUCER=1,CLUSTER=2 PRODUCER=1,CLUSTER=4 SETS=3 PRODUCER=1,SETS=3 BF16_PAIRS=1 PRODUCER=1,BF16_PAIRS=1}; do
        sm90_variant_step "$variant" 16
      done
      for variant in ${SM90_DIAG_VARIANTS:-PRODUCER=1,DIAG=1 PRODUCER=1,DIAG=3 PRODUCER=1,CLUSTER=2,DIAG=1}; do
        sm90_variant_step "$variant" 6 --time-only
      done
      # every build's checks and speeds so far in this call (gemm_sm90, gemm_sm90_diag and these) in one table
      STEP_TIMEOUT=30 TAIL=30 step gemm_sm90_summary python3 benchmarks/gpu_checks/nf4_gemm_sm90_summary.py "$OUT" \
        --out "$OUT/nf4_gemm_sm90_summary_${GPU_TAG:-h100}.md"
      ;;
    sm90_prebuild)
      # the standalone binaries of gemm_sm90, gemm_sm90_diag and gemm_sm90_variants built in the background (CPU only),
      # for a later stage of the same call with REUSE_BIN=1
      for variant in ${PREBUILD_VARIANTS:-plain DIAG=1 DIAG=2 DIAG=3 PRODUCER=1 SLICED=1 PRODUCER=1,SLICED=1 PRODUCER=1,CLUSTER=2 PRODUCER=1,CLUSTER=4 SETS=3 PRODUCER=1,SETS=3 BF16_PAIRS=1 PRODUCER=1,BF16_PAIRS=1 PRODUCER=1,DIAG=1 PRODUCER=1,DIAG=3 PRODUCER=1,CLUSTER=2,DIAG=1}; do
        settings=${variant//,/ }
        [ "$variant" = plain ] && settings=
        env $settings BUILD_ONLY=1 bash benchmarks/gpu_checks/nf4_gemm_sm90_check.sh \
          > "$OUT/prebuild_$(echo "$variant" | tr -d = | tr , _).log" 2>&1 &
      done
      ;;
    ring_tables_first)
      # session 28: the M = 1 ring with the NF4 table from constants and the nested map copied ahead of the weight
      # (TABLES_FIRST in gemv_v16_experiment.py): whether the tables or the stream gate the first item. The traced
      # timeline of both forms, then the untraced A/B at M = 1 and 4
      STEP_TIMEOUT=200 TAIL=3 step ring_tables_first_timeline "$PY" benchmarks/gpu_checks/ring_timeline.py \
        --out "$OUT/ring_timeline_tables_first_${GPU_TAG:-h100}.json"
      STEP_TIMEOUT=150 step ring_tables_first_ab "$PY" benchmarks/gpu_checks/gemv_v16_experiment.py \
        --variants ring2_c3 ring2_c3_tf ring3 ring3_tf --m 1 4 --out "$OUT/gemv_ring_tables_first_${GPU_TAG:-h100}.json"
      ;;
    ncu_gemm_sm90)
      # session 28's question for the next device call: why the Hopper NF4 GEMM runs at ~560 TFLOP/s against cuBLAS'
      # ~768 at M = 2048 (docs/nf4_gemm_sm90.md). Nsight Compute on one launch at 4096x4096 and 28672x8192 (the check's
      # binary, built by the gemm_sm90 stage): tensor-pipe and issue utilisation, warp stalls (per SASS line in the
      # SourceCounters section), shared-memory wavefronts
      # NCU_DIAGS="0 1" profiles the diagnostic build without the dequantization too (session 29: the pipeline alone
      # runs at ~0.86x cuBLAS, the real kernel at ~0.70x)
      wait  # for sm90_prebuild's builds, if it ran
      for d in ${NCU_DIAGS:-0}; do
        bin=/tmp/nf4_gemm_sm90_check
        [ "$d" = 0 ] || bin=/tmp/nf4_gemm_sm90_check_diag$d
        [ -x "$bin" ] || DIAG=$d BUILD_ONLY=1 step "gemm_sm90_build_diag$d" bash benchmarks/gpu_checks/nf4_gemm_sm90_check.sh
        for shape in ${NCU_SHAPES:-4096x4096 28672x8192}; do
          STEP_TIMEOUT=150 TAIL=${NCU_TAIL:-60} step "ncu_gemm_sm90_diag${d}_$shape" ncu --kernel-name regex:nf4_gemm_sm90 \
            --launch-skip 2 --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
            --section WarpStateStats --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis \
            --section SourceCounters "$bin" --time-only --shapes "$shape" --m 2048
          # the numbers the sections draw as charts only: each stall reason per issued instruction, the tensor and
          # shared-memory pipes' activity, shared-memory wavefronts
          STEP_TIMEOUT=150 TAIL=${NCU_TAIL:-60} step "ncu_gemm_sm90_metrics_diag${d}_$shape" ncu \
            --kernel-name regex:nf4_gemm_sm90 --launch-skip 2 --launch-count 1 --metrics \
            "regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$,regex:^sm__pipe_tensor_op.*cycles_active\.avg\.pct_of_peak_sustained_active$,regex:^sm__pipe_shared_cycles_active.*pct_of_peak_sustained_active$,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed.sum" \
            "$bin" --time-only --shapes "$shape" --m 2048
        done
      done
      ;;
    timeline)
      # session 27: the CuPy ring's per-warp timeline at M = 1 (ring_timeline.py): where the small shapes' fixed
      # cost goes (warp starts, tables, first arrival, arrivals, tile end) in ring2_c3 and ring3
      STEP_TIMEOUT=200 TAIL=12 step ring_timeline "$PY" benchmarks/gpu_checks/ring_timeline.py \
        --out "$OUT/ring_timeline_${GPU_TAG:-h100}.json"
      ;;
    sm90_route)
      # session 28: nf4_gemm's Hopper kernel in the library (past 64 rows, bf16, blocksize 64): its tests and the
      # tiled kernel's, memcheck on its tests, then the routes at M 65..2048 against the dense route and bf16 cuBLAS
      STEP_TIMEOUT=200 TAIL=4 step sm90_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE \
        tests/test_nf4_gemm_sm90.py tests/test_nf4_gemm.py
      STEP_TIMEOUT=150 TAIL=3 step sm90_memcheck compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest \
        -q -p no:cacheprovider -m "not not_under_sanitizer" tests/test_nf4_gemm_sm90.py -k "matches_reference and 1000x1024"
      STEP_TIMEOUT=200 step sm90_bench "$PY" benchmarks/bench_nf4_gemm.py --m 65 128 256 512 1024 2048 \
        --out "$OUT/nf4_gemm_sm90_route_${GPU_TAG:-h100}.json"
      ;;
    x_ahead)
      # session 26: ring32 with x one item ahead (the only form now; the M <= 4 ring's, variant "ring_xpf" then, was
      # 1-8% slower and is gone): the GEMV tests of the ring variants and auto, the PDL chains, memcheck on ring32, the A/B of auto
      # against factored_fill at M = 1..16 (the bars' numbers)
      STEP_TIMEOUT=150 TAIL=3 step x_ahead_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_nf4_gemv.py \
        tests/test_programmatic_launch.py -k "cuda-ring or ring_large or cuda-auto or auto_takes or variant_switch or chain \
        or reads_the_x or generate"
      STEP_TIMEOUT=120 TAIL=3 step x_ahead_memcheck compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest \
        -q -p no:cacheprovider -m "not not_under_sanitizer" tests/test_nf4_gemv.py -k "cuda-ring32 and (many_tiles or block_sizes)"
      STEP_TIMEOUT=150 step x_ahead_ab "$PY" benchmarks/bench_nf4_linear.py --variants auto,factored_fill \
        --m 1 4 5 8 16 --out "$OUT/nf4_gemv_ring32_x_ahead_${GPU_TAG:-h100}.json"
      ;;
    auto_rings)
      # session 25: "auto" with the ring's x loads hoisted (ring_early_x, the only order now) and ring32 at
      # 5 <= M <= 16: the GEMV tests of the ring variants and auto, racecheck of ring32 on its kernels only
      # (the reference's cuBLAS split-K kernels report hazards of their own), the A/B at M = 1..16, the 8B decode
      STEP_TIMEOUT=120 TAIL=3 step auto_rings_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_nf4_gemv.py \
        -k "cuda-ring or ring_large or cuda-auto or auto_takes or variant_switch"
      # (--kernel-name filtering breaks racecheck on the H100; so every kernel is instrumented and the step fails
      # on a hazard reported in any kernel but cuBLAS's nvjet ones, or on a failed test)
      STEP_TIMEOUT=150 TAIL=8 step ring32_racecheck bash -c "compute-sanitizer --tool racecheck $PY -m pytest -q \
        -p no:cacheprovider -m 'not not_under_sanitizer' tests/test_nf4_gemv.py -k 'cuda-ring32 and matches_reference \
        and bfloat16 and (17x256 or 50x768 or 64x4096 or 300x3072)' > $OUT/ring32_racecheck_full.log 2>&1; rc=\$?; \
        grep 'Race reported' $OUT/ring32_racecheck_full.log | sort | uniq -c; \
        ! grep 'Race reported' $OUT/ring32_racecheck_full.log | grep -qv nvjet && [ \$rc -eq 0 ] && tail -3 $OUT/ring32_racecheck_full.log"
      STEP_TIMEOUT=150 step auto_rings_ab "$PY" benchmarks/bench_nf4_linear.py --variants auto,ring32,factored_fill \
        --m 1 2 4 5 6 7 8 12 16 --out "$OUT/nf4_gemv_auto_rings_${GPU_TAG:-h100}.json"
      STEP_TIMEOUT=150 step auto_rings_decode "$PY" benchmarks/bench_decode.py --stacks bf16,nf4_merged --repeats 2 \
        --gemv-variants auto,factored_fill --variants-without-pdl --out "$OUT/decode_8b_auto_rings_${GPU_TAG:-h100}.json"
      ;;
    ring32_stages)
      # session 25 (then with 4 stages where the tiles fit one round at one CTA a SM, N <= 32 SMs; reverted): ring32's
      # GEMV tests (weights either side of that boundary), memcheck on them, the A/B at M = 1..16
      STEP_TIMEOUT=120 TAIL=3 step ring32_stages_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_nf4_gemv.py \
        -k "cuda-ring32 or cuda-auto or ring32_through_auto or auto_takes or variant_switch"
      STEP_TIMEOUT=120 TAIL=3 step ring32_stages_memcheck compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest \
        -q -p no:cacheprovider tests/test_nf4_gemv.py -k "ring32_through_auto or (cuda-ring32 and many_tiles)"
      STEP_TIMEOUT=150 step ring32_stages_ab "$PY" benchmarks/bench_nf4_linear.py --variants auto,factored_fill \
        --m 1 4 5 8 16 --out "$OUT/nf4_gemv_ring32_stages_${GPU_TAG:-h100}.json"
      ;;
    ring32)
      # session 24's library port of gemv_ring32 (variant "ring32": M <= 16 on 32-row tiles; not yet run): its
      # GEMV tests, memcheck and racecheck on its cases, then the A/B with auto and factored_fill at M = 1..16
      STEP_TIMEOUT=120 TAIL=3 step ring32_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_nf4_gemv.py \
        -k "cuda-ring32 or (variant_switch and ring32)"
      STEP_TIMEOUT=150 step ring32_memcheck compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest -q \
        -p no:cacheprovider -m "not not_under_sanitizer" tests/test_nf4_gemv.py \
        -k "cuda-ring32 and (matches_reference and bfloat16 or many_tiles or block_sizes)"
      STEP_TIMEOUT=150 step ring32_racecheck compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" -m pytest -q \
        -p no:cacheprovider -m "not not_under_sanitizer" tests/test_nf4_gemv.py \
        -k "cuda-ring32 and matches_reference and bfloat16 and (17x256 or 50x768 or 64x4096 or 300x3072)"
      STEP_TIMEOUT=150 step ring32_ab "$PY" benchmarks/bench_nf4_linear.py --variants ring32,auto,factored_fill \
        --m 1 4 8 16 --out "$OUT/nf4_gemv_ring32_${GPU_TAG:-h100}.json"
      ;;
    ring_final)
      # session 22, after the ring kernel's wait lost its memory clobber: the library's ring against the
      # CuPy ring kernels it came from ("library" column), the A/B with factored_fill, the 8B decode
      # (bf16, bitsandbytes, NF4 merged / with LoRA), then every test outside the GEMV files
      STEP_TIMEOUT=120 step ring_vs_experiment "$PY" benchmarks/gpu_checks/gemv_v16_experiment.py --variants ring3 ring2_c3 \
        --m 1 4 --out "$OUT/gemv_ring_library_${GPU_TAG:-h100}.json"
      STEP_TIMEOUT=100 step ring_ab "$PY" benchmarks/bench_nf4_linear.py --variants ring,factored_fill \
        --m 1 4 16 --out "$OUT/nf4_gemv_ring_${GPU_TAG:-h100}.json"
      STEP_TIMEOUT=150 step decode "$PY" benchmarks/bench_decode.py --repeats 2 --out "$OUT/decode_8b_ring_${GPU_TAG:-h100}.json"
      STEP_TIMEOUT=${REST_TIMEOUT:-180} step rest_tests "$PY" -m pytest tests -n 14 -q -p no:cacheprovider -rfE \
        --ignore tests/test_nf4_gemv.py --ignore tests/test_nf4_gemv_grouped.py --ignore tests/test_nf4_gemv_swiglu.py
      ;;
    ring_check)
      # session 22's last call: the 8B decode with the ring default against factored_fill (same run),
      # the GEMV tests after the issue path's fixed per-lane offsets, the library's ring against the CuPy
      # ring kernels, and ring_final's three memory-measuring failures rerun alone
      STEP_TIMEOUT=130 step decode_ab "$PY" benchmarks/bench_decode.py --stacks bf16,nf4_merged --repeats 2 \
        --gemv-variants ring,factored_fill --out "$OUT/decode_8b_ring_ab_${GPU_TAG:-h100}.json"
      STEP_TIMEOUT=170 step ring_tests "$PY" -m pytest -n 14 -q -p no:cacheprovider -rfE tests/test_nf4_gemv.py \
        tests/test_nf4_gemv_grouped.py tests/test_nf4_gemv_swiglu.py
      STEP_TIMEOUT=60 step ring_vs_experiment "$PY" benchmarks/gpu_checks/gemv_v16_experiment.py --variants ring3 ring2_c3 \
        --m 1 --out "$OUT/gemv_ring_library2_${GPU_TAG:-h100}.json"
      STEP_TIMEOUT=60 step memory_tests "$PY" -m pytest -q -p no:cacheprovider -rfE \
        "tests/test_fused_loss.py::test_a_chunk_holds_its_fp32_logits_and_one_model_dtype_copy_only" \
        "tests/test_fused_mlp.py::test_fewer_activations_kept_on_the_device" \
        "tests/test_fused_path.py::test_sdpa_priority_trains_within_the_rule_and_runs_its_backend"
      ;;
    ring_decode)
      # next after session 22: "ring" is 13-25% faster than factored_fill alone at M = 1 but the 8B decode
      # ran 13% slower with it (+8 us a ring launch). Hypothesis: with programmatic dependent launch its
      # persistent grid (73-92 KB of shared memory a CTA) cannot sit beside the kernel before it, so CTAs
      # start late and the slowest SM sets the time. Decode per variant with and without PDL, then the
      # kernels of a decode step per variant (8 layers)
      STEP_TIMEOUT=200 step ring_decode "$PY" benchmarks/bench_decode.py --stacks bf16,nf4_merged --repeats 2 \
        --gemv-variants ring,ring_plain,factored_fill --variants-without-pdl --out "$OUT/decode_8b_ring_pdl_${GPU_TAG:-h100}.json"
      for v in ring ring_plain factored_fill; do
        QLORA_NF4_GEMV_VARIANT=$v STEP_TIMEOUT=120 TAIL=40 step "decode_profile_$v" "$PY" benchmarks/profile_decode.py --layers 8 --steps 8
      done
      ;;
    auto_tests)
      # session 23's "auto" variant in the GEMV tests
      STEP_TIMEOUT=60 TAIL=3 step auto_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_nf4_gemv.py \
        tests/test_nf4_gemv_grouped.py tests/test_nf4_gemv_swiglu.py -k "cuda-auto or auto_takes or variant_switch_api"
      ;;
    carveout)
      # the shared-memory configuration each GEMV kernel gets (ncu), alone and in two decode steps (session 25
      # ran this with the decode at forced ring footprints, switches since removed: decode_8b_ring_configs_h100.json)
      ncu_metrics=launch__shared_mem_config_size,launch__shared_mem_per_block_dynamic,launch__shared_mem_per_block_static,launch__grid_size
      STEP_TIMEOUT=40 TAIL=40 step ncu_carveout ncu --kernel-name regex:"nf4_gemv" --metrics "$ncu_metrics" \
        "$PY" benchmarks/gpu_checks/ncu_probe_carveout.py
      for v in ring factored_fill; do  # every kernel of two decode steps (2 layers)
        STEP_TIMEOUT=90 TAIL=80 step "ncu_carveout_decode_$v" ncu --profile-from-start off --metrics "$ncu_metrics" \
          "$PY" benchmarks/gpu_checks/ncu_probe_carveout.py --decode --variant $v
      done
      ;;
    auto_default)
      # before "auto" becomes the default: every CUDA test with it selected at process start (the
      # GEMV tests already run each variant), and the 8B decode with it against factored_fill
      QLORA_NF4_GEMV_VARIANT=auto STEP_TIMEOUT=330 TAIL=6 step auto_all_tests "$PY" -m pytest tests -n 14 -q \
        -p no:cacheprovider -rfE
      STEP_TIMEOUT=150 step auto_decode "$PY" benchmarks/bench_decode.py --stacks bf16,nf4_merged --repeats 2 \
        --gemv-variants auto,factored_fill --variants-without-pdl --out "$OUT/decode_8b_auto_${GPU_TAG:-h100}.json"
      ;;
    fixes_s22)
      # session 22's fixes of three CUDA tests that failed on the H100 (made without a GPU): the chunked
      # loss's freed dL/dz, the attention replay under SDPA_PRIORITY, the fused MLP's temporary input
      STEP_TIMEOUT=120 step fixes_s22 "$PY" -m pytest -q -p no:cacheprovider -rfE \
        "tests/test_fused_loss.py::test_a_chunk_holds_its_fp32_logits_and_one_model_dtype_copy_only" \
        "tests/test_fused_mlp.py::test_fewer_activations_kept_on_the_device" \
        "tests/test_fused_path.py::test_sdpa_priority_trains_within_the_rule_and_runs_its_backend"
      STEP_TIMEOUT=120 step fixes_s22_replay "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_fused_path.py \
        tests/test_attention_replay.py -k "sdpa or replay or record"
      ;;
    gemv_sass)
      # next after session 21: where in the SASS "factored" stalls (per-instruction warp-state samples,
      # M = 1, 28672x8192), and the SASS of the M <= 8 factored kernels to count instructions per step
      VARIANTS=${NCU_VARIANT:-factored} SHAPES=${NCU_SHAPES:-28672x8192} STEP_TIMEOUT=150 TAIL=2 step gemv_sass_stalls \
        ncu --kernel-name regex:nf4_gemv --launch-skip 1 --launch-count 1 --section WarpStateStats --section SourceCounters \
        --page source --print-source sass "$PY" benchmarks/gpu_checks/ncu_gemv.py
      so=$(ls python/qlora_ext/_C*.so | head -1)
      STEP_TIMEOUT=60 TAIL=2 step gemv_sass_dump bash -c "cuobjdump -sass '$so' | awk '/Function : .*nf4_gemv_factored_kernel/,/\.\.\.\.\.\.\.\.\./'"
      ;;
    lean)
      # session 21: factored_lean / factored_lean_wide (the one-weight factored kernel at 80 registers,
      # 3 CTAs a SM): the GEMV tests of every variant (bit-equality with "factored" included), then the
      # A/B against the default at M = 1 and 16, then memcheck on the new variants' tests
      STEP_TIMEOUT=200 step lean_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_nf4_gemv.py \
        tests/test_nf4_gemv_grouped.py tests/test_nf4_gemv_swiglu.py -k "cuda or variant or lean"
      STEP_TIMEOUT=150 step lean_ab "$PY" benchmarks/bench_nf4_linear.py --variants factored_fill,factored_lean,factored_lean_wide \
        --m 1 16 --out "$OUT/nf4_gemv_lean_${GPU_TAG:-h100}.json"
      STEP_TIMEOUT=120 step lean_memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m pytest -q -p no:cacheprovider \
        -x tests/test_nf4_gemv.py -k "lean"
      ;;
    gemv_ab)
      step gemv_tests "$PY" -m pytest -n 12 -q -p no:cacheprovider -rfE tests/test_nf4_gemv.py tests/test_nf4_gemm.py -k "cuda or variant"
      step gemv_ab "$PY" benchmarks/bench_nf4_linear.py --variants all --m 1 4 8 9 16 --out "$OUT/nf4_gemv_variants_h100.json"
      ;;
    dora_new)
      # DoRA's newest CUDA paths on the GPU: the MLP's gate/up backward in one op
      # (swiglu_scaled_dora_backward: its op tests, the fused MLP's bit-equality tests), the Q/K/V
      # unit's stacked norms, dora_scale's A·Aᵀ kernel, the 1B's down z kept on the device (on by
      # default since 2026-12-06), the checkpointing tests that count the norms; the new kernel
      # under the three sanitizers (its op tests, and the workload's section)
      step dora_new_tests "$PY" -m pytest -n 8 -q -p no:cacheprovider -rfE tests/test_swiglu_dora_backward.py \
        tests/test_fused_qkv.py tests/test_lora_family.py tests/test_checkpointing.py tests/test_fused_mlp.py \
        tests/test_block_ops.py -k "dora or norm or unread or swiglu or one_op"
      RUNS=$'memcheck tests/test_swiglu_dora_backward.py\nracecheck tests/test_swiglu_dora_backward.py\ninitcheck tests/test_swiglu_dora_backward.py' \
        STEP_TIMEOUT=300 step sanitize_dora_new bash benchmarks/gpu_checks/sanitize_tests.sh "$OUT/sanitizer_tests_dora_new_h100.txt" 3
      ;;
    dora_ab)
      # DoRA's kernels alone (bench_dora_kernels), then QDoRA vs QLoRA, the cases stepping in turns
      # (bench_lora_family --interleave, plus one profiled step each: --kernel-time): dora (the
      # defaults) and the defaults without parts of them (DORA_AB_CASES; bench_lora_family.CASES
      # lists them: dora-session10 is the defaults as session 10 left them, dora-fused_swiglu_backward
      # the gate/up backward in three ops)
      step dora_kernels "$PY" benchmarks/bench_dora_kernels.py --out "$OUT/dora_kernels_h100.json"
      for shape in 8b 1b; do
        step "dora_ab_$shape" "$PY" benchmarks/bench_lora_family.py --shapes $shape \
          --cases "${DORA_AB_CASES:-lora,dora,dora-fused_swiglu_backward,dora-session10}" \
          --interleave --kernel-time --warmup 3 --steps ${DORA_AB_STEPS:-16} --out "$OUT/lora_family_dora_ab_${shape}_h100.json"
      done
      # where the host-bound 1B step spends its host time, QLoRA against QDoRA as it is by default
      TAIL=40 step dora_profile_host_1b "$PY" benchmarks/profile_lora_family.py --shape 1b --cases lora,dora --host --top 40
      ;;
    family)
      # every LoRA-family variant against QLoRA, one shape per run, the cases stepping in turns:
      # step time and peak memory per variant (issue #7's benchmark); GPU_TAG names the files' card
      for shape in 8b 1b; do
        step "family_$shape" "$PY" benchmarks/bench_lora_family.py --shapes $shape \
          --cases lora,lora+rslora,lora+loraplus,dora,lora_fa,vera,vera_r256,delta_lora \
          --interleave --warmup 3 --steps 12 --out "$OUT/lora_family_${shape}_${GPU_TAG:-h100}.json"
      done
      ;;
    train_ab)
      # The defaults against what they replaced, 8B: the recomputation that skips the MLP's down
      # projection (ours) vs the full one, the Q/K/V weights dequantized into one buffer vs torch.cat
      step train_ab "$PY" benchmarks/bench_train.py --model 8b --seq 2048 8192 --steps 8 \
        --stacks ours,ours_full_recompute,ours_qkv_cat,unsloth --kernel-time --out "$OUT/train_8b_ab_h100.json"
      ;;
    decode_ab)
      # generation with nf4_gemv's default variant ("factored") against the former one ("mma")
      step decode_factored "$PY" benchmarks/bench_decode.py --stacks bf16,nf4_lora,nf4_merged --repeats 2 \
        --out "$OUT/decode_factored_h100.json"
      QLORA_NF4_GEMV_VARIANT=mma step decode_mma "$PY" benchmarks/bench_decode.py --stacks nf4_lora,nf4_merged \
        --repeats 2 --out "$OUT/decode_mma_h100.json"
      ;;
    sanitize_rest)
      # Racecheck of the GEMV file's variant tests (1,140 of its 1,404), every kernel instrumented
      # (--kernel-name filtering makes racecheck fail with "Internal Sanitizer Error" on the H100,
      # 2026-12-06, twice) and every report printed. 2026-12-06 they all passed in five processes
      # of ~228 tests (one per variant; ~600 s each with nine at once), but with --print-limit 20 the
      # reports past the 20th were not attributed: ten processes of ~114 tests each now.
      racecheck_parts
      RUNS=$(for n in 1 2 3 4 5; do printf 'racecheck tests/test_nf4_gemv.py %s 0:114\nracecheck tests/test_nf4_gemv.py %s 114\n' $n $n; done)
      RUNS="$RUNS" STEP_TIMEOUT="${SANITIZE_TIMEOUT:-540}" step sanitize_rest_racecheck \
        bash benchmarks/gpu_checks/sanitize_tests.sh "$OUT/sanitizer_tests_racecheck_h100.txt" 10
      ;;
    sanitize_variants)
      # racecheck of the fused Q/K/V tests (every kernel instrumented: --kernel-name filtering made
      # racecheck fail with "Internal Sanitizer Error" on the H100, 2026-12-06), in parallel with the
      # three tools over the workload (every GEMV variant) and the DoRA tests on the GPU
      RUNS='racecheck tests/test_fused_qkv.py' STEP_TIMEOUT="${SANITIZE_TIMEOUT:-400}" step sanitize_qkv_racecheck \
        bash benchmarks/gpu_checks/sanitize_tests.sh "$OUT/sanitizer_tests_qkv_racecheck_h100.txt" 1 &
      step dora_tests "$PY" -m pytest -n 6 -q -p no:cacheprovider -rfE tests/test_lora_family.py tests/test_fused_mlp.py \
        tests/test_fused_qkv.py tests/test_bench_lora_family.py -k "dora or column_scale or lora_family"
      step sanitize_workload bash -c "for k in registers rows; do for t in memcheck racecheck initcheck; do QLORA_DORA_SCALE_KERNEL=\$k compute-sanitizer --tool \$t --error-exitcode 9 $PY benchmarks/sanitize_workload.py 2>&1 | tail -3; done; done"
      wait
      ;;
    *)
      echo "unknown stage $stage"; status=1 ;;
  esac
done
exit $status
