// Fused multi-tensor AdamW update, 32-bit and 8-bit blockwise state (math: qlora/adamw.h).
//
// Both kernels take a batch of up to kMaxTensors tensors by value (pointers, sizes and the first
// chunk of each, ~1.5-2 KiB of kernel parameters), so a whole parameter group is one or a few
// launches instead of one per tensor. Each CTA finds its tensor by a binary search over the
// batch's chunk prefix sums and updates one chunk.
//
// 32-bit: chunk = 4096 elements; 256 threads, 4 consecutive elements per thread per iteration
// (16-byte fp32 state vectors; 16- or 8-byte param/grad vectors) when every pointer of the tensor
// is 16-byte aligned, else scalar. Bytes per element: param r+w, grad r (2 x sizeof(T) + sizeof(T))
// and m, v r+w (16): 28 B for fp32 parameters, 22 B for bf16. FLOPs: ~12 per element plus a sqrt
// and a division; memory-bound, the target is the device's copy bandwidth.
//
// 8-bit: chunk = 8 quantization blocks of 256 elements; 256 threads, one element per thread per
// block. Both 256-entry maps and their midpoints are staged in shared memory once per CTA
// (4 KiB); the new absmax of m and v is a warp-shuffle + shared-memory max; re-quantization is
// the 8-step midpoint search of blockwise8.h. Bytes per element: param r+w, grad r, 2 code bytes
// r+w, 8/256 absmax bytes r+w: 16.06 B for fp32 parameters, 10.06 B for bf16.
#include <algorithm>

#include "cuda_common.cuh"
#include "qlora/kernels_cuda.h"

namespace qlora {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kMaxTensors = 32;
constexpr int64_t kChunk32 = 4096;
constexpr int kBlocksPerChunk8 = 8;
constexpr int64_t kChunk8 = kBlocksPerChunk8 * kAdamW8BlockSize;
static_assert(kAdamW8BlockSize == kThreads, "the 8-bit kernel maps one thread to one element");

template <typename Tensor>
struct Batch {
  Tensor tensors[kMaxTensors];
  int64_t first_chunk[kMaxTensors + 1];  // prefix sums of chunks; [count] = total
  int count;
};

// Index of the tensor that holds `chunk`: the last i with first_chunk[i] <= chunk.
template <typename Tensor>
__device__ __forceinline__ int tensor_of_chunk(const Batch<Tensor>& batch, int64_t chunk) {
  int lo = 0, hi = batch.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (batch.first_chunk[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// 4 consecutive elements of T as floats, and back (16-bit types as one 8-byte access).
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
}
__device__ __forceinline__ void store4(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&v)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = Element<T>::to_float(e[i]);
}
template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&v)[4]) {
  *reinterpret_cast<uint2*>(p) = make_uint2(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
adamw32_kernel(const __grid_constant__ Batch<AdamW32Tensor> batch, int64_t chunk_base,
               const AdamWHyper h) {
  const int64_t chunk = chunk_base + blockIdx.x;
  const int ti = tensor_of_chunk(batch, chunk);
  const AdamW32Tensor& t = batch.tensors[ti];
  T* param = static_cast<T*>(t.param);
  const T* grad = static_cast<const T*>(t.grad);
  const int64_t begin = (chunk - batch.first_chunk[ti]) * kChunk32;
  const int64_t end = min(t.n, begin + kChunk32);
  const bool vector = ((reinterpret_cast<uintptr_t>(param) | reinterpret_cast<uintptr_t>(grad) |
                        reinterpret_cast<uintptr_t>(t.exp_avg) |
                        reinterpret_cast<uintptr_t>(t.exp_avg_sq)) & 15u) == 0;
  if (vector) {
    for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * kThreads) {
      if (i + 4 <= end) {
        float p[4], g[4], m[4], v[4];
        load4(param + i, p);
        load4(grad + i, g);
        load4(t.exp_avg + i, m);
        load4(t.exp_avg_sq + i, v);
#pragma unroll
        for (int k = 0; k < 4; ++k) adamw_update(p[k], g[k], m[k], v[k], h);
        store4(param + i, p);
        store4(t.exp_avg + i, m);
        store4(t.exp_avg_sq + i, v);
      } else {
        for (int64_t j = i; j < end; ++j) {
          float p = Element<T>::to_float(param[j]);
          adamw_update(p, Element<T>::to_float(grad[j]), t.exp_avg[j], t.exp_avg_sq[j], h);
          param[j] = Element<T>::from_float(p);
        }
      }
    }
    return;
  }
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    float p = Element<T>::to_float(param[j]);
    adamw_update(p, Element<T>::to_float(grad[j]), t.exp_avg[j], t.exp_avg_sq[j], h);
    param[j] = Element<T>::from_float(p);
  }
}

// Max over the CTA of a per-thread value, NaN-propagating; every thread gets the result.
__device__ __forceinline__ float cta_absmax(float a, float* warp_partial) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, a, offset);
    a = (other > a || other != other) ? other : a;
  }
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) warp_partial[warp] = a;
  __syncthreads();
  float r = warp_partial[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) {
    const float other = warp_partial[w];
    r = (other > r || other != other) ? other : r;
  }
  __syncthreads();  // warp_partial is reused by the next reduction
  return r;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
adamw8_kernel(const __grid_constant__ Batch<AdamW8Tensor> batch, int64_t chunk_base,
              const float* __restrict__ map1, const float* __restrict__ map2, const AdamWHyper h) {
  __shared__ float s_map1[kCodeMapSize], s_map2[kCodeMapSize];
  __shared__ float s_mid1[kCodeMapSize - 1], s_mid2[kCodeMapSize - 1];
  __shared__ float warp_partial[kThreads / 32];
  s_map1[threadIdx.x] = map1[threadIdx.x];
  s_map2[threadIdx.x] = map2[threadIdx.x];
  __syncthreads();
  if (threadIdx.x < kCodeMapSize - 1) {
    s_mid1[threadIdx.x] = (s_map1[threadIdx.x] + s_map1[threadIdx.x + 1]) / 2.0f;
    s_mid2[threadIdx.x] = (s_map2[threadIdx.x] + s_map2[threadIdx.x + 1]) / 2.0f;
  }
  __syncthreads();

  const int64_t chunk = chunk_base + blockIdx.x;
  const int ti = tensor_of_chunk(batch, chunk);
  const AdamW8Tensor& t = batch.tensors[ti];
  T* param = static_cast<T*>(t.param);
  const T* grad = static_cast<const T*>(t.grad);
  const int64_t first_block = (chunk - batch.first_chunk[ti]) * kBlocksPerChunk8;
  const int64_t n_blocks = (t.n + kAdamW8BlockSize - 1) / kAdamW8BlockSize;
  const int64_t last_block = min(n_blocks, first_block + kBlocksPerChunk8);
  for (int64_t b = first_block; b < last_block; ++b) {  // uniform across the CTA
    const int64_t i = b * kAdamW8BlockSize + threadIdx.x;
    const bool live = i < t.n;
    float m = 0.0f, v = 0.0f;
    if (live) {
      m = __fmul_rn(s_map1[t.exp_avg_codes[i]], t.exp_avg_absmax[b]);
      v = __fmul_rn(s_map2[t.exp_avg_sq_codes[i]], t.exp_avg_sq_absmax[b]);
      float p = Element<T>::to_float(param[i]);
      adamw_update(p, Element<T>::to_float(grad[i]), m, v, h);
      param[i] = Element<T>::from_float(p);
    }
    // Dead lanes contribute |0|, which never raises a block's absmax.
    const float amax1 = cta_absmax(fabsf(m), warp_partial);
    const float amax2 = cta_absmax(fabsf(v), warp_partial);
    if (threadIdx.x == 0) {
      t.exp_avg_absmax[b] = amax1;
      t.exp_avg_sq_absmax[b] = amax2;
    }
    if (live) {
      const float inv1 = 1.0f / fmaxf(amax1, kMinAbsmax);
      const float inv2 = 1.0f / fmaxf(amax2, kMinAbsmax);
      const float s1 = fminf(1.0f, fmaxf(-1.0f, __fmul_rn(m, inv1)));
      const float s2 = fminf(1.0f, fmaxf(-1.0f, __fmul_rn(v, inv2)));
      t.exp_avg_codes[i] = uint8_t(code8_of(s1, s_mid1));
      t.exp_avg_sq_codes[i] = uint8_t(code8_of(s2, s_mid2));
    }
  }
}

// Splits `tensors` into batches of kMaxTensors and launches `launch(batch, chunk_base, grid)`
// per batch, in grid slices below the 2^31 - 1 limit.
template <typename Tensor, typename Launch>
cudaError_t for_each_batch(const Tensor* tensors, int count, int64_t chunk, Launch&& launch) {
  constexpr int64_t kMaxGrid = 0x7fffffff;
  for (int start = 0; start < count; start += kMaxTensors) {
    Batch<Tensor> batch{};
    batch.count = 0;
    int64_t chunks = 0;
    for (int i = start; i < count && batch.count < kMaxTensors; ++i) {
      if (tensors[i].n == 0) continue;
      batch.tensors[batch.count] = tensors[i];
      batch.first_chunk[batch.count] = chunks;
      chunks += ceil_div(tensors[i].n, chunk);
      ++batch.count;
    }
    if (batch.count == 0) continue;
    batch.first_chunk[batch.count] = chunks;
    for (int64_t base = 0; base < chunks; base += kMaxGrid) {
      const cudaError_t status = launch(batch, base, unsigned(std::min(chunks - base, kMaxGrid)));
      if (status != cudaSuccess) return status;
    }
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t adamw32_step_cuda(const AdamW32Tensor* tensors, int count, FloatType type,
                              const AdamWHyper& h, cudaStream_t stream) {
  return dispatch_float_type(type, [&](auto element) {
    using T = decltype(element);
    return for_each_batch(tensors, count, kChunk32,
                          [&](const Batch<AdamW32Tensor>& batch, int64_t base, unsigned grid) {
                            adamw32_kernel<T><<<grid, kThreads, 0, stream>>>(batch, base, h);
                            return cudaGetLastError();
                          });
  });
}

cudaError_t adamw8_step_cuda(const AdamW8Tensor* tensors, int count, FloatType type,
                             const float* exp_avg_map, const float* exp_avg_sq_map,
                             const AdamWHyper& h, cudaStream_t stream) {
  return dispatch_float_type(type, [&](auto element) {
    using T = decltype(element);
    return for_each_batch(tensors, count, kChunk8,
                          [&](const Batch<AdamW8Tensor>& batch, int64_t base, unsigned grid) {
                            adamw8_kernel<T><<<grid, kThreads, 0, stream>>>(
                                batch, base, exp_avg_map, exp_avg_sq_map, h);
                            return cudaGetLastError();
                          });
  });
}

}  // namespace qlora
