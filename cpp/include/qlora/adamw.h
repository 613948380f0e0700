// Fused AdamW update (decoupled weight decay, bias correction) with 32-bit or 8-bit blockwise
// state. Torch-free: plain pointers and sizes; CUDA entry points are in kernels_cuda.h.
//
// Per element, in fp32 whatever the parameter's type (bf16/fp16 parameters are loaded, updated in
// fp32 and rounded back to nearest-even once):
//
//   g  = grad * grad_scale                      (grad_scale: the caller's clipping coefficient)
//   p  = p * (1 - lr * weight_decay)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * (g * g)
//   p  = p - step_size * (m / (sqrt(v) * inv_bc2_sqrt + eps))
//        step_size = lr / (1 - beta1^step), inv_bc2_sqrt = 1 / sqrt(1 - beta2^step)
//
// Every product and sum is rounded separately (no FMA: the CPU kernels build with
// -ffp-contract=off and only they use the host branch below; the CUDA kernels use the _rn
// intrinsics, which nvcc never contracts), and division and sqrt are IEEE,
// so the CPU and CUDA kernels and the fp32 PyTorch reference give the same bits.
//
// 8-bit state (bitsandbytes' blockwise dynamic-map layout): m and v are stored as uint8 codes with
// an fp32 absmax per block of kAdamW8BlockSize consecutive elements; m against the signed dynamic
// map, v against the unsigned one. The update dequantizes (map[code] * absmax), updates as above,
// takes the new absmax of the block, and re-quantizes to the nearest code (ties to the lower one,
// code8_of in blockwise8.h) of value / max(absmax, kMinAbsmax) clamped to [-1, 1].
#pragma once

#include <cmath>
#include <cstdint>

#include "qlora/blockwise8.h"
#include "qlora/float_types.h"

#if defined(__CUDACC__)
#define QLORA_ADAMW_HD __host__ __device__ __forceinline__
#else
#define QLORA_ADAMW_HD inline
#endif

namespace qlora {

constexpr int64_t kAdamW8BlockSize = 256;

// Per-launch scalars, precomputed on the host (in double, then rounded once to fp32).
struct AdamWHyper {
  float beta1 = 0.9f;
  float one_minus_beta1 = 0.1f;
  float beta2 = 0.999f;
  float one_minus_beta2 = 0.001f;
  float eps = 1e-8f;
  float decay = 1.0f;         // 1 - lr * weight_decay
  float step_size = 1e-3f;    // lr / (1 - beta1^step)
  float inv_bc2_sqrt = 1.0f;  // 1 / sqrt(1 - beta2^step)
  float grad_scale = 1.0f;
};

// Host-side construction from the user's hyperparameters; step >= 1.
AdamWHyper make_adamw_hyper(double lr, double beta1, double beta2, double eps,
                            double weight_decay, int64_t step, double grad_scale);

// Separately rounded fp32 arithmetic, identical on host and device.
#if defined(__CUDA_ARCH__)
QLORA_ADAMW_HD float rn_mul(float a, float b) { return __fmul_rn(a, b); }
QLORA_ADAMW_HD float rn_add(float a, float b) { return __fadd_rn(a, b); }
QLORA_ADAMW_HD float rn_sub(float a, float b) { return __fsub_rn(a, b); }
QLORA_ADAMW_HD float rn_div(float a, float b) { return __fdiv_rn(a, b); }
QLORA_ADAMW_HD float rn_sqrt(float a) { return __fsqrt_rn(a); }
#else
QLORA_ADAMW_HD float rn_mul(float a, float b) { return a * b; }
QLORA_ADAMW_HD float rn_add(float a, float b) { return a + b; }
QLORA_ADAMW_HD float rn_sub(float a, float b) { return a - b; }
QLORA_ADAMW_HD float rn_div(float a, float b) { return a / b; }
QLORA_ADAMW_HD float rn_sqrt(float a) { return std::sqrt(a); }  // IEEE, correctly rounded
#endif

// One element's update; p, m, v in and out.
QLORA_ADAMW_HD void adamw_update(float& p, float grad, float& m, float& v, const AdamWHyper& h) {
  const float g = rn_mul(grad, h.grad_scale);
  m = rn_add(rn_mul(h.beta1, m), rn_mul(h.one_minus_beta1, g));
  v = rn_add(rn_mul(h.beta2, v), rn_mul(h.one_minus_beta2, rn_mul(g, g)));
  const float denom = rn_add(rn_mul(rn_sqrt(v), h.inv_bc2_sqrt), h.eps);
  p = rn_sub(rn_mul(p, h.decay), rn_mul(h.step_size, rn_div(m, denom)));
}

// One tensor's 32-bit state: param and grad of the call's FloatType, m and v fp32, n elements.
struct AdamW32Tensor {
  void* param = nullptr;
  const void* grad = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  int64_t n = 0;
};

// One tensor's 8-bit state: codes [n] uint8, absmax [ceil(n / kAdamW8BlockSize)] fp32.
struct AdamW8Tensor {
  void* param = nullptr;
  const void* grad = nullptr;
  uint8_t* exp_avg_codes = nullptr;
  float* exp_avg_absmax = nullptr;
  uint8_t* exp_avg_sq_codes = nullptr;
  float* exp_avg_sq_absmax = nullptr;
  int64_t n = 0;
};

// CPU: elements [begin, end) of one tensor.
void adamw32_step_cpu(const AdamW32Tensor& t, FloatType type, int64_t begin, int64_t end,
                      const AdamWHyper& h);

// CPU: blocks [block_begin, block_end) of one tensor. exp_avg_map / exp_avg_sq_map: the sorted
// 256-entry signed and unsigned dynamic maps (any sorted maps work).
void adamw8_step_cpu(const AdamW8Tensor& t, FloatType type, int64_t block_begin, int64_t block_end,
                     const float* exp_avg_map, const float* exp_avg_sq_map, const AdamWHyper& h);

}  // namespace qlora
