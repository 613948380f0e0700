// One-token attention over a static KV cache with grouped K/V heads (math and layout:
// qlora/decode_attention.h), split over the cache's slots ("flash decoding"), in two launches:
//
//   1. partials, grid (splits, Hk, B): CTA (j, hk, b) takes slots [j*chunk, (j+1)*chunk) below the
//      filled length P and, for the G query heads of K/V head hk, writes its softmax partials
//      (running max m, sum l = sum exp(score - m), acc = sum exp(score - m) * v) to a workspace.
//      Each K and V row of the slice is read once for all G heads: a warp per slot computes the G
//      dot products (lanes over D), then every thread sums p * v for (head, 2 columns) pairs.
//   2. combine, grid (Hk, B): out = sum_j exp(m_j - M) acc_j / sum_j exp(m_j - M) l_j.
//
// Why split: one CTA per K/V head (8 for Llama-3-8B) would leave 124 of 132 SMs idle and read the
// cache at one SM's bandwidth; ~32 slots per CTA give the H100 a hundred-odd CTAs for a 500-token
// cache, each one round of loads. Both kernels launch programmatically (dependent_launch.cuh):
// the combine is scheduled under the partials, the partials under the kernel before.
// Replaces SDPA's one-query call in the decode step (cuDNN: ~6 us and a memset per layer on the
// H100 at 500 slots), which also needs the whole static cache and a mask over all its slots.
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "dependent_launch.cuh"
#include "qlora/kernels_cuda.h"

namespace qlora {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxChunk = 64;  // slots per CTA
constexpr int kMaxGroup = 16;  // query heads per K/V head

// The mask's contribution to slot s's score: 0 (allowed), -inf (excluded) or the additive value.
template <typename T>
__device__ __forceinline__ float mask_term(const DecodeAttentionArgs& a, int64_t b, int64_t s) {
  if (a.mask_kind == MaskKind::None) return 0.0f;
  const int64_t i = b * a.mask_stride_b + s * a.mask_stride_s;
  if (a.mask_kind == MaskKind::Boolean) return static_cast<const bool*>(a.mask)[i] ? 0.0f : -INFINITY;
  if (a.mask_type == FloatType::F32) return static_cast<const float*>(a.mask)[i];
  return Element<T>::to_float(static_cast<const T*>(a.mask)[i]);
}

// Workspace per (b, hk, split): G rows of D + 2 floats (acc[D], m, l).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
decode_attention_partials_kernel(const DecodeAttentionArgs a, int chunk, float* __restrict__ workspace) {
  constexpr int kPerLane = D / 32;
  __shared__ float q_s[kMaxGroup][D];
  __shared__ float p_s[kMaxGroup][kMaxChunk];
  __shared__ float m_s[kMaxGroup], l_s[kMaxGroup];
  allow_dependents();
  dependency_wait();  // q, the caches and the length come from the kernels before
  const int split = blockIdx.x, splits = gridDim.x;
  const int64_t hk = blockIdx.y, b = blockIdx.z;
  const int G = int(a.q_heads / a.kv_heads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t filled = *a.length;
  const int64_t first = int64_t(split) * chunk;
  const int64_t end = first + chunk < filled ? first + chunk : filled;
  const int count = end > first ? int(end - first) : 0;

  const T* q = static_cast<const T*>(a.q) + b * a.q_stride_b + hk * G * a.q_stride_h;
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    q_s[i / D][i % D] = Element<T>::to_float(q[(i / D) * a.q_stride_h + i % D]) * a.scale;
  }
  __syncthreads();

  // Scores: a warp per slot, lanes over D, the G dot products reduced across the warp.
  const T* keys = static_cast<const T*>(a.key_cache) + b * a.k_stride_b + hk * a.k_stride_h;
  for (int s = warp; s < count; s += kWarps) {
    const T* k = keys + (first + s) * a.k_stride_s + lane * kPerLane;
    float kv[kPerLane];
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) kv[e] = Element<T>::to_float(k[e]);
    const float bias = mask_term<T>(a, b, first + s);
    for (int g = 0; g < G; ++g) {
      float dot = 0.0f;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) dot = fmaf(q_s[g][lane * kPerLane + e], kv[e], dot);
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      if (lane == 0) p_s[g][s] = dot + bias;
    }
  }
  __syncthreads();

  // Softmax partials per head: a warp per head, lanes over the slots.
  for (int g = warp; g < G; g += kWarps) {
    float m = -INFINITY;
    for (int s = lane; s < count; s += 32) m = fmaxf(m, p_s[g][s]);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    float l = 0.0f;
    for (int s = lane; s < count; s += 32) {
      const float p = m == -INFINITY ? 0.0f : __expf(p_s[g][s] - m);
      p_s[g][s] = p;
      l += p;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) l += __shfl_xor_sync(0xffffffffu, l, offset);
    if (lane == 0) {
      m_s[g] = m;
      l_s[g] = l;
    }
  }
  __syncthreads();

  // acc[g][d] = sum_s p[g][s] * v[s][d]: a thread per (head, column pair), each V row read once
  // per column pair (coalesced over the threads of a head).
  const T* values = static_cast<const T*>(a.value_cache) + b * a.v_stride_b + hk * a.v_stride_h;
  float* out = workspace + ((b * a.kv_heads + hk) * splits + split) * int64_t(G) * (D + 2);
  for (int i = threadIdx.x; i < G * (D / 2); i += kThreads) {
    const int g = i / (D / 2), d = (i % (D / 2)) * 2;
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int s = 0; s < count; ++s) {
      const T* v = values + (first + s) * a.v_stride_s + d;
      const float p = p_s[g][s];
      acc0 = fmaf(p, Element<T>::to_float(v[0]), acc0);
      acc1 = fmaf(p, Element<T>::to_float(v[1]), acc1);
    }
    out[g * (D + 2) + d] = acc0;
    out[g * (D + 2) + d + 1] = acc1;
  }
  if (threadIdx.x < G) {
    out[threadIdx.x * (D + 2) + D] = m_s[threadIdx.x];
    out[threadIdx.x * (D + 2) + D + 1] = l_s[threadIdx.x];
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
decode_attention_combine_kernel(const DecodeAttentionArgs a, int splits, const float* __restrict__ workspace) {
  allow_dependents();
  dependency_wait();  // the partials
  const int64_t hk = blockIdx.x, b = blockIdx.y;
  const int G = int(a.q_heads / a.kv_heads);
  const float* parts = workspace + (b * a.kv_heads + hk) * splits * int64_t(G) * (D + 2);
  T* out = static_cast<T*>(a.out) + (b * a.q_heads + hk * G) * D;
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    float m = -INFINITY;
    for (int j = 0; j < splits; ++j) m = fmaxf(m, parts[(int64_t(j) * G + g) * (D + 2) + D]);
    float num = 0.0f, den = 0.0f;
    if (m != -INFINITY) {
      for (int j = 0; j < splits; ++j) {
        const float* row = parts + (int64_t(j) * G + g) * (D + 2);
        const float w = row[D] == -INFINITY ? 0.0f : __expf(row[D] - m);
        num = fmaf(w, row[d], num);
        den = fmaf(w, row[D + 1], den);
      }
    }
    out[int64_t(g) * D + d] = Element<T>::from_float(den > 0.0f ? num / den : 0.0f);
  }
}

// Splits of the cache's slots: ceil(L / 32), so a CTA takes <= 32 slots (<= kMaxChunk).
int64_t decode_attention_cuda_splits(int64_t capacity) {
  return std::max<int64_t>(1, ceil_div(capacity, kMaxChunk / 2));
}

}  // namespace

int64_t decode_attention_cuda_workspace(const DecodeAttentionArgs& a) {
  return a.batch * a.q_heads * decode_attention_cuda_splits(a.capacity) * (a.head_dim + 2);
}

cudaError_t decode_attention_cuda(const DecodeAttentionArgs& a, float* workspace, cudaStream_t stream) {
  if (a.batch == 0 || a.q_heads == 0) return cudaSuccess;
  if (a.kv_heads <= 0 || a.q_heads % a.kv_heads != 0 || a.q_heads / a.kv_heads > kMaxGroup || a.capacity <= 0 ||
      a.batch > 65535 || a.kv_heads > 65535) {
    return cudaErrorInvalidValue;
  }
  const int64_t splits = decode_attention_cuda_splits(a.capacity);
  if (splits > INT32_MAX) return cudaErrorInvalidValue;
  const int chunk = int(ceil_div(a.capacity, splits));  // <= kMaxChunk / 2 + 1
  return dispatch_float_type(a.type, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // fp16 / bf16 only (the torch glue checks)
    } else {
      auto launch = [&](auto partials, auto combine) -> cudaError_t {
        cudaError_t status = launch_kernel(partials, dim3(unsigned(splits), unsigned(a.kv_heads), unsigned(a.batch)),
                                           dim3(kThreads), 0, stream, a, chunk, workspace);
        if (status != cudaSuccess) return status;
        return launch_kernel(combine, dim3(unsigned(a.kv_heads), unsigned(a.batch)), dim3(kThreads), 0, stream, a,
                             int(splits), static_cast<const float*>(workspace));
      };
      switch (a.head_dim) {
        case 64: return launch(decode_attention_partials_kernel<T, 64>, decode_attention_combine_kernel<T, 64>);
        case 128: return launch(decode_attention_partials_kernel<T, 128>, decode_attention_combine_kernel<T, 128>);
        case 256: return launch(decode_attention_partials_kernel<T, 256>, decode_attention_combine_kernel<T, 256>);
        default: return cudaErrorInvalidValue;
      }
    }
  });
}

}  // namespace qlora
