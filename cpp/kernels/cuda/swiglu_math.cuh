// SwiGLU's elementwise math on the device (qlora/swiglu.h), shared by the SwiGLU kernels
// (swiglu_cuda.cu) and DoRA's fused gate/up backward (dora_cuda.cu), which must give the same bits.
// expf (not __expf): a full-precision exponential costs nothing in these memory-bound kernels and
// keeps the CUDA results close to the CPU kernel's. Torch-free.
#pragma once

#include <cuda_runtime.h>

namespace qlora {
namespace cuda_detail {

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

__device__ __forceinline__ float swiglu(float g, float u) { return g * sigmoid(g) * u; }

// dg = d·u·s·(1 + g·(1 − s)), du = d·g·s (s = sigmoid(g)); dg and du may alias g and u.
__device__ __forceinline__ void swiglu_grad(float d, float g, float u, float& dg, float& du) {
  const float s = sigmoid(g);
  dg = d * u * (s * (1.0f + g * (1.0f - s)));
  du = d * (g * s);
}

}  // namespace cuda_detail
}  // namespace qlora
