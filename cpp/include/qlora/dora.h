// DoRA's per-output-column scale and its backward (Liu et al. 2024, arXiv 2402.09353). Torch-free:
// plain pointers and sizes; the torch glue is cpp/torch/dora_ops_{cpu,cuda}.cpp.
//
// DoRA's weight is W' = m ⊙ V / ‖V‖_row with V = W + s·B·A (W [N, K], A [r, K], B [N, r]) and the
// norm detached (a constant in backward, paper §4.3). Nothing [N, K] is formed for the norm: with
// wa = W·Aᵀ [N, r] (taken from the W the forward GEMM dequantizes anyway) and G = A·Aᵀ [r, r],
//
//     n_i² = ‖W_i‖² + 2s·⟨W_i, (BA)_i⟩ + s²·‖(BA)_i‖²
//          = weight_sq_i + Σ_j B_ij·(2s·wa_ij + s²·Σ_l G_jl·B_il)          O(r²) per row
//     inv_norm_i = 1 / √max(n_i², 0)        (a zero row gives inf, as the dense formula does)
//     col_scale_i = m_i · inv_norm_i
//
// so that y = z ⊙ col_scale (+ bias) with z = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, the plain LoRA output
// (dora_column_scale: the product rounded to fp32, then the bias added in fp32, then one rounding
// to T; no fused multiply-add, so the CPU and CUDA kernels give the same bits).
// Backward (n constant):  dz = dy ⊙ col_scale;   dm_i = inv_norm_i · Σ_rows dy_i·z_i.
//
// Everything is summed in fp32 (the CPU column sums of the backward in double); col_scale and dz
// are rounded once to the activation type T (that of wa, z, dy).
#pragma once

#include <cstdint>

#include "qlora/float_types.h"

#if defined(QLORA_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

namespace qlora {

// The forward for S DoRA layers at once, their output rows stacked (the attention's q, k and v:
// one launch where three would run): layer j owns rows [row_end[j-1], row_end[j]) of the N, has
// rank r and scale s_j, and its A_j is rows [j·r, (j+1)·r) of the stacked A [S·r, K]. Then wa =
// W_stacked·A_stackedᵀ is [N, S·r] and row i of layer j uses its columns [j·r, (j+1)·r) (the
// other blocks are W_i·A_kᵀ of the other layers, unused), gram = A_stacked·A_stackedᵀ [S·r, S·r]
// its diagonal block (j, j). With S = 1 this is the single layer of the formula above.
constexpr int kMaxDoRAStack = 4;
struct DoRAStack {
  int count = 1;                         // S, 1..kMaxDoRAStack
  int64_t row_end[kMaxDoRAStack] = {};  // cumulative; row_end[S-1] = N
  float scale[kMaxDoRAStack] = {};
};

// Rows [row_begin, row_end) of the forward: wa [N, S·r] of `type`; lora_B fp32 [N, r]; gram =
// A·Aᵀ fp32 [S·r, S·r]; weight_sq, magnitude fp32 [N] -> col_scale [N] of `type`, inv_norm fp32 [N].
void dora_scale_cpu(const void* wa, FloatType type, const float* lora_b, const float* gram,
                    const float* weight_sq, const float* magnitude, int64_t r,
                    const DoRAStack& stack, int64_t row_begin, int64_t row_end, void* col_scale,
                    float* inv_norm);

// Columns [col_begin, col_end) of the backward: dy, z [M, N] and col_scale [N] of `type`,
// inv_norm fp32 [N] -> dz [M, N] of `type`, dmagnitude fp32 [N].
void dora_scale_backward_cpu(const void* dy, const void* z, const void* col_scale,
                             const float* inv_norm, FloatType type, int64_t M, int64_t N,
                             int64_t col_begin, int64_t col_end, void* dz, float* dmagnitude);

// Rows [row_begin, row_end) of y = z ⊙ col_scale (+ bias): z, y [M, N], col_scale and bias [N]
// (bias may be null), all of `type`.
void dora_column_scale_cpu(const void* z, const void* col_scale, const void* bias, FloatType type,
                           int64_t N, int64_t row_begin, int64_t row_end, void* y);

#if defined(QLORA_WITH_CUDA) || defined(__CUDACC__)
// dora_cuda.cu, y = z ⊙ col_scale (+ bias) over all of [M, N] (M, N >= 1), on `stream`.
cudaError_t dora_column_scale_cuda(const void* z, const void* col_scale, const void* bias,
                                   FloatType type, int64_t M, int64_t N, int num_sms, void* y,
                                   cudaStream_t stream);

// dora_cuda.cu, the forward above for all N rows (device pointers), on `stream`.
cudaError_t dora_scale_cuda(const void* wa, FloatType type, const float* lora_b,
                            const float* gram, const float* weight_sq, const float* magnitude,
                            int64_t N, int64_t r, const DoRAStack& stack, void* col_scale,
                            float* inv_norm, cudaStream_t stream);

// dora_cuda.cu, gram's diagonal blocks G_jj = A_j·A_jᵀ [r, r] (fp32) of the S = `layers` stacked
// A_j (rows j·r.. of lora_a [S·r, K], fp32, contiguous), written into gram [S·r, S·r] at block
// (j, j); the other blocks are left as they are. On `stream`.
cudaError_t dora_gram_cuda(const float* lora_a, int64_t K, int64_t r, int layers, float* gram,
                           cudaStream_t stream);

// dora_cuda.cu, the backward above for all of [M, N] (M >= 1, N >= 1). `partial` is fp32 scratch
// of dora_backward_chunks(M, N, num_sms) * N elements: per-chunk column sums, reduced in a
// fixed order by a second launch, so dmagnitude is deterministic (no atomics).
cudaError_t dora_scale_backward_cuda(const void* dy, const void* z, const void* col_scale,
                                     const float* inv_norm, FloatType type, int64_t M, int64_t N,
                                     int num_sms, void* dz, float* dmagnitude, float* partial,
                                     cudaStream_t stream);

// dora_cuda.cu, DoRA's gate and up backward through the SwiGLU of their scaled outputs in one
// pass (M >= 1, N >= 1): dh, z_gate, z_up [M, N] and gate_scale, up_scale [N] of `type`,
// gate_inv_norm, up_inv_norm fp32 [N] -> dz_gate, dz_up [M, N] of `type`, dm_gate, dm_up fp32 [N];
// the bits of swiglu_scaled_backward (qlora/swiglu.h) followed by dora_scale_backward_cuda on each
// of its two outputs. `partial`: fp32 scratch of 2 * dora_backward_chunks(M, N, num_sms) * N.
cudaError_t swiglu_scaled_dora_backward_cuda(const void* dh, const void* z_gate, const void* z_up,
                                             const void* gate_scale, const void* up_scale,
                                             const float* gate_inv_norm, const float* up_inv_norm,
                                             FloatType type, int64_t M, int64_t N, int num_sms,
                                             void* dz_gate, void* dz_up, float* dm_gate,
                                             float* dm_up, float* partial, cudaStream_t stream);

// The number of row chunks dora_scale_backward_cuda splits [M, N] into (its scratch's rows).
int64_t dora_backward_chunks(int64_t M, int64_t N, int num_sms);
#endif

}  // namespace qlora
