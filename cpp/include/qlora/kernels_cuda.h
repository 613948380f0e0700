// CUDA entry points of the torch-free kernel library. Each takes device pointers, sizes and the
// stream to launch on, and returns the launch's error code (cudaSuccess or the first failure).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "qlora/adamw.h"
#include "qlora/blockwise8.h"
#include "qlora/decode_attention.h"
#include "qlora/float_types.h"
#include "qlora/nf4.h"
#include "qlora/rms_norm.h"
#include "qlora/rope.h"
#include "qlora/swiglu.h"

namespace qlora {

// nf4_quantize_cuda.cu: x [n] of `type` -> packed [(n+1)/2] uint8, absmax [ceil(n/blocksize)] fp32.
cudaError_t nf4_quantize_cuda(const void* x, FloatType type, int64_t n, int64_t blocksize,
                              uint8_t* packed, float* absmax, cudaStream_t stream);

// nf4_dequantize_cuda.cu: packed + scales -> out [n] of `type`.
cudaError_t nf4_dequantize_cuda(const uint8_t* packed, const NF4Scales& scales, int64_t n,
                                int64_t blocksize, void* out, FloatType type,
                                cudaStream_t stream);
// The same into rows: W's n elements as rows of row_elements (n a multiple), row i written at
// out + i * row_stride (row_stride >= row_elements; elements); cudaErrorInvalidValue otherwise.
cudaError_t nf4_dequantize_rows_cuda(const uint8_t* packed, const NF4Scales& scales, int64_t n,
                                     int64_t blocksize, int64_t row_elements, int64_t row_stride,
                                     void* out, FloatType type, cudaStream_t stream);

// nf4_gemv_cuda.cu: y [M, N] = x [M, K] · deq(W [N, K])ᵀ (+ bias [N]), x/bias/y of `type`,
// 1 <= M <= 16, K >= 1; W as packed codes [(N*K+1)/2] + scales. bias may be nullptr.
cudaError_t nf4_gemv_cuda(const void* x, FloatType type, int64_t M, int64_t K,
                          const uint8_t* packed, const NF4Scales& scales, int64_t blocksize,
                          int64_t N, const void* bias, void* y, cudaStream_t stream);

// nf4_gemv_cuda.cu: several weights [rows_p, K] that multiply the same x in one launch (the
// attention's q, k, v; the MLP's gate and up): y [M, sum rows_p] holds part p's product (+ its
// slice of bias [sum rows_p]) in columns [sum_{q<p} rows_q, ... + rows_p), exactly the columns
// nf4_gemv_cuda would write part by part with the same variant's factored kernel (but where
// "factored_fill" gives the whole launch its 3-CTA shape and a part alone would not: the same
// products, summed in another order). Only cases
// nf4_gemv_grouped_cuda_supported accepts (cudaErrorInvalidValue otherwise): 1 <= M <= 16,
// 1..kMaxGemvParts parts, fp16/bf16, sm_80+, K % 64 == 0, blocksize >= 64, x and every part's codes
// 16-byte aligned, every part but the last a multiple of kGroupedPartRows rows, all parts plain or
// all double-quantized (one nested_blocksize; the parts' nested_code maps must hold the same
// values: the kernel reads part 0's). The kernel is the current variant's when it is a factored
// one, else "factored".
constexpr int kMaxGemvParts = 4;
constexpr int64_t kGroupedPartRows = 32;  // the largest row tile of the factored kernels
struct NF4GemvPart {
  const uint8_t* packed;
  NF4Scales scales;
  int64_t rows;
};
bool nf4_gemv_grouped_cuda_supported(FloatType type, int64_t M, int64_t K, const void* x,
                                     const NF4GemvPart* parts, int count, int64_t blocksize);
cudaError_t nf4_gemv_grouped_cuda(const void* x, FloatType type, int64_t M, int64_t K, const NF4GemvPart* parts,
                                  int count, int64_t blocksize, const void* bias, void* y, cudaStream_t stream);

// nf4_gemv_cuda.cu: the MLP's gate and up [N, K] with SwiGLU in the epilogue, one launch:
// y [M, N] = T(silu(g) * u) with g, u the grouped GEMV's outputs as it would store them (each
// rounded to T, bias [2N] = gate's then up's added before) and the SwiGLU kernels' fp32 math, i.e.
// the bits of nf4_gemv_grouped_cuda followed by swiglu_forward_cuda. Cases
// nf4_gemv_swiglu_cuda_supported accepts (cudaErrorInvalidValue otherwise): the grouped launch's,
// with gate.rows == up.rows (any count). Always "factored"'s tile shapes.
bool nf4_gemv_swiglu_cuda_supported(FloatType type, int64_t M, int64_t K, const void* x, const NF4GemvPart& gate,
                                    const NF4GemvPart& up, int64_t blocksize);
cudaError_t nf4_gemv_swiglu_cuda(const void* x, FloatType type, int64_t M, int64_t K, const NF4GemvPart& gate,
                                 const NF4GemvPart& up, int64_t blocksize, const void* bias, void* y,
                                 cudaStream_t stream);

// nf4_gemv_cuda.cu: which fast-path kernel nf4_gemv_cuda launches, process-wide, read at each
// launch (so a CUDA graph keeps the kernel it captured). For measuring the variants against each
// other in one process; 10 ("factored_fill") is the default. Variants other than 0 apply where their kernel
// does (fp16/bf16, K % 64 == 0, blocksize >= 64, aligned data, sm_80+); elsewhere the launcher
// takes the path variant 0 would. set returns false (and changes nothing) for an unknown number;
// name returns nullptr for one.
int nf4_gemv_cuda_variant_count();
const char* nf4_gemv_cuda_variant_name(int variant);
bool nf4_gemv_cuda_set_variant(int variant);
int nf4_gemv_cuda_variant();

// nf4_gemm_cuda.cu: whether nf4_gemm_cuda runs this case on the current device: sm_80+, fp16/bf16,
// 1 <= M <= kNF4GemmMaxRows, K a positive multiple of 64, x and packed 16-byte aligned. The caller
// takes another route (dequantize + a matrix product) otherwise.
bool nf4_gemm_cuda_supported(FloatType type, int64_t M, int64_t N, int64_t K, const void* x,
                             const uint8_t* packed);

// nf4_gemm_cuda.cu: fp32 elements of workspace nf4_gemm_cuda needs for this shape (0: none; then
// workspace may be nullptr). Depends on the current device's SM count.
int64_t nf4_gemm_cuda_workspace(int64_t M, int64_t N, int64_t K);

// nf4_gemm_cuda.cu: y [M, N] = x [M, K] · deq(W [N, K])ᵀ (+ bias [N]), x/bias/y of `type`, on
// tensor cores with W dequantized inside the GEMM; only cases nf4_gemm_cuda_supported accepts
// (cudaErrorInvalidValue otherwise). bias may be nullptr.
cudaError_t nf4_gemm_cuda(const void* x, FloatType type, int64_t M, int64_t K, const uint8_t* packed,
                          const NF4Scales& scales, int64_t blocksize, int64_t N, const void* bias,
                          void* y, float* workspace, cudaStream_t stream);

// nf4_gemm_sm90.cu: the Hopper NF4 GEMM (wgmma with the weight dequantized into registers, TMA for x;
// docs/nf4_gemm_sm90.md), the same product as nf4_gemm_cuda for bf16 x, blocksize 64, K % 64 == 0, N % 8 == 0,
// 16-byte aligned x, packed and y (y is checked at launch), any M. It exists where the build has sm_90a code (CMake:
// 90 in the architecture list); elsewhere supported() is false. device_ready: the current device is compute
// capability 9.0 and this build has the kernel's sm_90a code (asked once per device, then cached).
bool nf4_gemm_sm90_cuda_device_ready();
bool nf4_gemm_sm90_cuda_supported(FloatType type, int64_t M, int64_t N, int64_t K, int64_t blocksize,
                                  const NF4Scales& scales, const void* x, const uint8_t* packed);
cudaError_t nf4_gemm_sm90_cuda(const void* x, FloatType type, int64_t M, int64_t K, const uint8_t* packed,
                               const NF4Scales& scales, int64_t blocksize, int64_t N, const void* bias, void* y,
                               cudaStream_t stream);
// nf4_gemm_cuda.cu: the fewest rows for which the torch op nf4_gemm takes the Hopper kernel where it is supported
// (below: the tiled mma kernel up to kNF4GemmMaxRows rows, then dequantize + cuBLAS). Process-wide; tests and
// benchmarks move it to reach either kernel. set returns false (and changes nothing) for rows < 1.
int64_t nf4_gemm_sm90_min_rows();
bool nf4_gemm_set_sm90_min_rows(int64_t rows);

// blockwise8_cuda.cu: x [n] fp32 -> codes [n] uint8, absmax [ceil(n/blocksize)] fp32, of
// x - *offset when offset (a device pointer to one fp32) is given. code_map is a device pointer
// to the 256-entry sorted map.
cudaError_t blockwise8_quantize_cuda(const float* x, int64_t n, const float* code_map,
                                     int64_t blocksize, uint8_t* codes, float* absmax,
                                     cudaStream_t stream, const float* offset = nullptr);

// blockwise8_cuda.cu: codes [n] -> out [n] fp32.
cudaError_t blockwise8_dequantize_cuda(const uint8_t* codes, const float* absmax,
                                       const float* code_map, int64_t n, int64_t blocksize,
                                       float* out, cudaStream_t stream);

// adamw_cuda.cu: AdamW update of `count` tensors (host array of descriptors holding device
// pointers), all of parameter type `type`, 32-bit state (qlora/adamw.h).
cudaError_t adamw32_step_cuda(const AdamW32Tensor* tensors, int count, FloatType type,
                              const AdamWHyper& h, cudaStream_t stream);

// adamw_cuda.cu: the same with 8-bit blockwise state; exp_avg_map / exp_avg_sq_map are device
// pointers to the sorted 256-entry signed and unsigned dynamic maps.
cudaError_t adamw8_step_cuda(const AdamW8Tensor* tensors, int count, FloatType type,
                             const float* exp_avg_map, const float* exp_avg_sq_map,
                             const AdamWHyper& h, cudaStream_t stream);

// rms_norm_cuda.cu: the forward of every row (qlora/rms_norm.h).
cudaError_t rms_norm_forward_cuda(const RMSNormForwardArgs& a, cudaStream_t stream);

// rms_norm_cuda.cu: fp32 elements of workspace that rms_norm_backward_cuda needs for dweight.
int64_t rms_norm_backward_cuda_workspace(int64_t rows, int64_t D);

// rms_norm_cuda.cu: dx of every row, and dweight [D] of weight_type unless it is nullptr (then
// workspace may be nullptr too). rows == 0 launches nothing: the caller zero-fills dweight.
cudaError_t rms_norm_backward_cuda(const RMSNormBackwardArgs& a, void* dweight, float* workspace,
                                   cudaStream_t stream);

// decode_attention_cuda.cu: one-token attention over a static KV cache (qlora/decode_attention.h),
// fp16/bf16, D in {64, 128, 256}, G = Hq / Hk <= 16. `workspace` holds
// decode_attention_cuda_workspace(a) floats (the per-split softmax partials).
int64_t decode_attention_cuda_workspace(const DecodeAttentionArgs& a);
cudaError_t decode_attention_cuda(const DecodeAttentionArgs& a, float* workspace, cudaStream_t stream);

// dependent_launch.cu: programmatic dependent launch (sm_90+) of the kernels that support it (the
// NF4 GEMV, RMSNorm forward, SwiGLU forward, rope_append_kv_, decode_attention): each may start before the kernel
// before it ends and do its weight-only prologue there. Off by default; only for stretches where
// no kernel writes the weights those prologues read (qlora_ext.generate's decode steps).
// See cpp/kernels/cuda/dependent_launch.cuh.
bool programmatic_launch_enabled();
void set_programmatic_launch(bool enabled);

// rope_cuda.cu: RoPE of q and k in one launch (qlora/rope.h); needs seq * head_dim / 2 < 2^31.
cudaError_t rope_cuda(const RopeArgs& a, cudaStream_t stream);
// rope_cuda.cu: rope_append_kv_ (qlora/rope.h): one launch when the step is small (a decode step),
// else the rotation and copies over the GPU and a one-thread launch that advances *length.
cudaError_t rope_append_kv_cuda(const RopeAppendArgs& a, cudaStream_t stream);

// swiglu_cuda.cu: h [n] = silu(gate) * up, all of `type` (scaled operands: qlora/swiglu.h).
cudaError_t swiglu_forward_cuda(const void* gate, const void* up, void* h, int64_t n,
                                FloatType type, cudaStream_t stream, SwiGLUScales scales = {});

// swiglu_cuda.cu: dgate, dup [n] from dh, gate, up; dgate may be gate and dup may be up (unscaled).
cudaError_t swiglu_backward_cuda(const void* dh, const void* gate, const void* up, void* dgate,
                                 void* dup, int64_t n, FloatType type, cudaStream_t stream,
                                 SwiGLUScales scales = {});

}  // namespace qlora
