// NF4 dequantize: packed 4-bit codes + per-block scales -> fp32/fp16/bf16 (math: qlora/nf4.h).
//
//   out[i] = T(nf4[code(i)] * scale(i / blocksize)),  scale = absmax, or for double quantization
//   fp32(map8[q] * absmax2[b / 256]) + offset (two roundings, as bitsandbytes).
//
// Bytes: n/2 (codes) + n/blocksize (8-bit or 4n/blocksize fp32 scales) read, n*sizeof(T) written:
// 2.52 n bytes for bf16 at block 64 with double quantization. The kernel is memory-bound; the
// target is the device's copy bandwidth. FLOPs: one multiply per element.
//
// Launch: one thread per 32 elements (one 16-byte load of codes, four 16-byte stores of bf16);
// blocksize >= 32 so those 32 share one scale. 256 threads per CTA. The NF4 table lives in shared
// memory (16 banks, no conflicts). An unaligned codes pointer or a tail of < 32 elements takes a
// scalar path.
#include "cuda_common.cuh"
#include "qlora/kernels_cuda.h"

namespace qlora {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kElementsPerThread = 32;

template <typename T>
__global__ void __launch_bounds__(kThreads)
nf4_dequantize_kernel(const uint8_t* __restrict__ packed, NF4Scales scales, int64_t n,
                      int blocksize_log2, bool vector_ok, T* __restrict__ out) {
  __shared__ float table[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    if (threadIdx.x == i) table[i] = nf4_code(i);  // constant index: folds to an immediate
  }
  __syncthreads();

  const int64_t chunk = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t first = chunk * kElementsPerThread;
  if (first >= n) return;
  const float scale = nf4_block_scale(scales, first >> blocksize_log2);

  if (vector_ok && first + kElementsPerThread <= n) {
    const uint4 bytes16 = __ldg(reinterpret_cast<const uint4*>(packed + first / 2));
    const uint32_t words[4] = {bytes16.x, bytes16.y, bytes16.z, bytes16.w};
    float values[kElementsPerThread];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
      for (int byte = 0; byte < 4; ++byte) {
        const uint32_t b = (words[w] >> (8 * byte)) & 0xffu;
        values[w * 8 + byte * 2] = table[b >> 4] * scale;
        values[w * 8 + byte * 2 + 1] = table[b & 0x0fu] * scale;
      }
    }
    store_vectorized<kElementsPerThread>(out + first, values);
    return;
  }
  const int64_t last = min(n, first + kElementsPerThread);
  for (int64_t i = first; i < last; ++i) {
    const uint8_t b = packed[i / 2];
    const uint8_t code = (i & 1) ? (b & 0x0fu) : (b >> 4);
    out[i] = Element<T>::from_float(table[code] * scale);
  }
}

}  // namespace

cudaError_t nf4_dequantize_cuda(const uint8_t* packed, const NF4Scales& scales, int64_t n,
                                int64_t blocksize, void* out, FloatType type,
                                cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  int blocksize_log2 = 0;
  while ((int64_t(1) << blocksize_log2) < blocksize) ++blocksize_log2;
  const int64_t grid = ceil_div(ceil_div(n, kElementsPerThread), kThreads);
  const bool vector_ok = is_aligned(packed, 16) && is_aligned(out, 16);
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    nf4_dequantize_kernel<T><<<dim3(unsigned(grid)), kThreads, 0, stream>>>(
        packed, scales, n, blocksize_log2, vector_ok, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace qlora
