// 8-bit blockwise quantize / dequantize against a sorted 256-entry map (math: qlora/blockwise8.h).
// Used for the double-quantized NF4 scales (n = weight elements / 64, block 256), so sizes are
// modest; the kernels aim for simplicity over peak bandwidth.
//
// Quantize launch: one CTA of 256 threads per quantization block; the block's absmax is a
// warp-shuffle reduction, and each element's code an 8-step binary search over the 255 midpoints
// held in shared memory. Bytes: 5n read+written. Dequantize: one thread per element.
#include "cuda_common.cuh"
#include "qlora/kernels_cuda.h"

namespace qlora {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
blockwise8_quantize_kernel(const float* __restrict__ x, int64_t n, const float* __restrict__ code_map,
                           int64_t blocksize, uint8_t* __restrict__ codes,
                           float* __restrict__ absmax, const float* __restrict__ offset) {
  __shared__ float midpoints[kCodeMapSize - 1];
  __shared__ float warp_max[kThreads / 32];
  if (threadIdx.x < kCodeMapSize - 1) {
    midpoints[threadIdx.x] = (code_map[threadIdx.x] + code_map[threadIdx.x + 1]) / 2.0f;
  }
  const int64_t begin = int64_t(blockIdx.x) * blocksize;
  const int64_t end = min(n, begin + blocksize);
  // The centring subtraction of double quantization (x - offset), one fp32 rounding as in torch.
  const float shift = offset != nullptr ? *offset : 0.0f;
  float amax = 0.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    amax = max_abs_nan(amax, __fsub_rn(x[i], shift));
  }
  // Warp shuffles, then the 8 warp maxima through shared memory: one barrier (which also
  // publishes the midpoints) instead of a tree of eight.
#pragma unroll
  for (int lanes = 16; lanes > 0; lanes >>= 1) {
    amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, lanes));
  }
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) amax = max_nan(amax, warp_max[w]);
  if (threadIdx.x == 0) absmax[blockIdx.x] = amax;
  const float inv = 1.0f / fmaxf(amax, kMinAbsmax);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float scaled = fminf(1.0f, fmaxf(-1.0f, __fsub_rn(x[i], shift) * inv));
    codes[i] = uint8_t(code8_of(scaled, midpoints));
  }
}

__global__ void blockwise8_dequantize_kernel(const uint8_t* __restrict__ codes,
                                             const float* __restrict__ absmax,
                                             const float* __restrict__ code_map, int64_t n,
                                             int blocksize_log2, float* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __ldg(code_map + codes[i]) * __ldg(absmax + (i >> blocksize_log2));
}

}  // namespace

cudaError_t blockwise8_quantize_cuda(const float* x, int64_t n, const float* code_map,
                                     int64_t blocksize, uint8_t* codes, float* absmax,
                                     cudaStream_t stream, const float* offset) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(n, blocksize);
  blockwise8_quantize_kernel<<<dim3(unsigned(blocks)), kThreads, 0, stream>>>(
      x, n, code_map, blocksize, codes, absmax, offset);
  return cudaGetLastError();
}

cudaError_t blockwise8_dequantize_cuda(const uint8_t* codes, const float* absmax,
                                       const float* code_map, int64_t n, int64_t blocksize,
                                       float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  blockwise8_dequantize_kernel<<<dim3(unsigned(ceil_div(n, kThreads))), kThreads, 0, stream>>>(
      codes, absmax, code_map, n, log2_of_power_of_two(blocksize), out);
  return cudaGetLastError();
}

}  // namespace qlora
