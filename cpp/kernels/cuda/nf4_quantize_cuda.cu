// NF4 quantize: fp32/fp16/bf16 weight -> packed 4-bit codes + fp32 absmax per block
// (math and rounding: qlora/nf4.h; the reciprocal is IEEE, never fast-math).
//
// Bytes: n*sizeof(T) read, n/2 + 4n/blocksize written (bf16, block 64: 2.56 n bytes).
// FLOPs: ~10 per element (abs, max, multiply, clamp, 4-step code search); memory-bound.
//
// Launch: each thread loads 8 consecutive elements (one 16-byte load for 16-bit types), so a
// quantization block is blocksize/8 threads. Up to block 256 (<= 32 threads) the block's absmax is
// a shuffle reduction inside a warp and a CTA of 256 threads covers 2048 elements; from 512 up a
// CTA is one quantization block (64..512 threads) reduced through shared memory. Each thread
// writes its 8 codes as one 32-bit word.
#include "cuda_common.cuh"
#include "qlora/kernels_cuda.h"

namespace qlora {
namespace {

using namespace cuda_detail;

constexpr int kVec = 8;

__device__ __forceinline__ float group_max(float v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = (other > v || other != other) ? other : v;
  }
  return v;
}

// threads_per_block_q = blocksize / 8. CTA size: max(256, threads_per_block_q).
template <typename T>
__global__ void __launch_bounds__(512)
nf4_quantize_kernel(const T* __restrict__ x, int64_t n, int threads_per_qblock, bool aligned,
                    uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  __shared__ float midpoints[15];
  __shared__ float warp_max[16];
  // Constant indices after unrolling: host constexpr data folds into immediates.
#pragma unroll
  for (int i = 0; i < 15; ++i) {
    if (threadIdx.x == i) midpoints[i] = nf4_midpoint(i);
  }

  const int64_t first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  float v[kVec];
  const int64_t n_left = n - first;  // may be <= 0 for threads past the end; they load zeros
  load8(x + (first < n ? first : 0), n_left, aligned && n_left >= kVec, v);
  if (n_left <= 0) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = 0.0f;
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) amax = nan_propagating_absmax(amax, v[i]);

  if (threads_per_qblock <= 32) {
    amax = group_max(amax, threads_per_qblock);
  } else {
    amax = group_max(amax, 32);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_max[warp] = amax;
    __syncthreads();
    if (warp == 0) {
      const int warps = blockDim.x / 32;
      amax = group_max(lane < warps ? warp_max[lane] : 0.0f, 32);
      if (lane == 0) warp_max[0] = amax;
    }
    __syncthreads();
    amax = warp_max[0];
  }
  __syncthreads();  // midpoints visible
  if (n_left <= 0) return;

  const int64_t qblock = first / (int64_t(threads_per_qblock) * kVec);
  if (first % (int64_t(threads_per_qblock) * kVec) == 0) absmax[qblock] = amax;

  const float inv = 1.0f / fmaxf(amax, kMinAbsmax);
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float scaled = fminf(1.0f, fmaxf(-1.0f, v[i] * inv));
    // Elements past n (odd tail) have v = 0 and so take code 7, the padding bitsandbytes uses.
    const uint32_t code = uint32_t(nf4_code_of(scaled, midpoints));
    // Byte j of the word holds elements 2j (high nibble) and 2j+1 (low nibble).
    word |= code << ((i / 2) * 8 + ((i & 1) ? 0 : 4));
  }
  if (n_left >= kVec) {
    *reinterpret_cast<uint32_t*>(packed + first / 2) = word;
  } else {
    const int64_t bytes = (n_left + 1) / 2;
    for (int64_t j = 0; j < bytes; ++j) packed[first / 2 + j] = uint8_t(word >> (8 * j));
  }
}

}  // namespace

cudaError_t nf4_quantize_cuda(const void* x, FloatType type, int64_t n, int64_t blocksize,
                              uint8_t* packed, float* absmax, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int threads_per_qblock = int(blocksize / kVec);
  // Small blocks: 256-thread CTAs reduce in warps. Large ones: one CTA per block.
  const int cta = threads_per_qblock <= 32 ? 256 : threads_per_qblock;
  const int64_t threads = ceil_div(n, kVec);
  const int64_t grid = ceil_div(threads, cta);
  // packed + first/2 is 4-byte aligned whenever packed is; x + first is 16-byte aligned if x is.
  const bool aligned = is_aligned(x, 16) && is_aligned(packed, 4);
  if (!is_aligned(packed, 4)) return cudaErrorMisalignedAddress;
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    nf4_quantize_kernel<T><<<dim3(unsigned(grid)), cta, 0, stream>>>(
        static_cast<const T*>(x), n, threads_per_qblock, aligned, packed, absmax);
    return cudaGetLastError();
  });
}

}  // namespace qlora
