// One-token attention over a static KV cache with grouped K/V heads (math and layout:
// qlora/decode_attention.h), split over the cache's slots ("flash decoding"), in two launches:
//
//   1. partials, grid (splits, Hk, B): CTA (j, hk, b) takes slots [j*chunk, (j+1)*chunk) below the
//      filled length P and, for the G query heads of K/V head hk, writes its softmax partials
//      (running max m, sum l = sum exp(score - m), acc = sum exp(score - m) * v) to a workspace.
//      The slice goes through shared memory kSlots slots at a time: every K and V row of a group is
//      requested at once (16-byte loads where aligned), so a CTA waits about one memory round trip
//      per group, not one per slot; then lane s of warp w scores slot s for heads w, w + 4, ...
//      (rows padded by 4 bytes: the 32 lanes read 32 different banks), a warp's shuffles give the
//      head's max and sum, and each thread accumulates p * v for (head, column pair) items.
//      Groups after the first rescale the running sums (online softmax).
//   2. combine, grid (Hk, B): per head the weights exp(m_j - M) / sum_j exp(m_j - M) l_j go to
//      shared memory once, then out = sum_j weight_j acc_j, 4 partials' loads in flight at a time.
//
// Why split: one CTA per K/V head (8 for Llama-3-8B) would leave 124 of 132 SMs idle and read the
// cache at one SM's bandwidth; ~32 slots per CTA give the H100 a hundred-odd CTAs for a 500-token
// cache. Both kernels launch programmatically (dependent_launch.cuh): the combine is scheduled
// under the partials, the partials under the kernel before.
// History: the first version (2026-12-06) read each V element with a scalar load inside a loop over
// the slots, one memory round trip per slot: 2.14x bf16 decode against SDPA's 2.43x on the H100
// (decode_8b_final_h100.json), so its switch stayed off.
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
constexpr int kMaxGroup = 16;    // query heads per K/V head
constexpr int kMaxSplits = 256;  // partials per (b, hk): the combine's weight table
constexpr int64_t kTargetChunk = 32;  // slots per CTA while the splits allow

// Slots a CTA stages at a time: one per lane, 16 for D = 256 (shared memory).
template <int D>
__host__ __device__ constexpr int slots_per_group() {
  return D == 256 ? 16 : 32;
}

// The mask's contribution to slot s's score: 0 (allowed), -inf (excluded) or the additive value.
template <typename T>
__device__ __forceinline__ float mask_term(const DecodeAttentionArgs& a, int64_t b, int64_t s) {
  if (a.mask_kind == MaskKind::None) return 0.0f;
  const int64_t i = b * a.mask_stride_b + s * a.mask_stride_s;
  if (a.mask_kind == MaskKind::Boolean) return static_cast<const bool*>(a.mask)[i] ? 0.0f : -INFINITY;
  if (a.mask_type == FloatType::F32) return static_cast<const float*>(a.mask)[i];
  return Element<T>::to_float(static_cast<const T*>(a.mask)[i]);
}

// Two adjacent elements (4-byte aligned) as fp32.
__device__ __forceinline__ float2 load_pair(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }
__device__ __forceinline__ float2 load_pair(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

// Copies `count` rows of D elements (row stride `stride`) into shared rows of `pitch` elements.
// VEC: 16-byte pieces (the caller checked alignment), issued all before any is stored; else
// element by element.
template <typename T, int D, int kSlots, bool VEC>
__device__ __forceinline__ void stage_rows(T* dst, int pitch, const T* src, int64_t stride, int count) {
  if constexpr (VEC) {
    constexpr int kPieces = kSlots * D / 8;  // 8 elements a piece
    constexpr int kPerThread = (kPieces + kThreads - 1) / kThreads;
    uint4 v[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int piece = threadIdx.x + i * kThreads;
      const int row = piece / (D / 8), col = (piece % (D / 8)) * 8;
      v[i] = piece < kPieces && row < count ? __ldg(reinterpret_cast<const uint4*>(src + row * stride + col))
                                            : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int piece = threadIdx.x + i * kThreads;
      const int row = piece / (D / 8), col = (piece % (D / 8)) * 8;
      if (piece < kPieces) {  // (pitch keeps 4-byte alignment only: four 4-byte stores)
        uint32_t* out = reinterpret_cast<uint32_t*>(dst + row * pitch + col);
        out[0] = v[i].x;
        out[1] = v[i].y;
        out[2] = v[i].z;
        out[3] = v[i].w;
      }
    }
  } else {
    for (int i = threadIdx.x; i < kSlots * D; i += kThreads) {
      const int row = i / D, col = i % D;
      dst[row * pitch + col] = row < count ? src[row * stride + col] : Element<T>::from_float(0.0f);
    }
  }
}

// Workspace per (b, hk, split): G rows of D + 2 floats (acc[D], m, l).
template <typename T, int D, bool VEC>
__global__ void __launch_bounds__(kThreads)
decode_attention_partials_kernel(const DecodeAttentionArgs a, int chunk, float* __restrict__ workspace) {
  constexpr int kSlots = slots_per_group<D>();
  constexpr int kPitch = D + 2;  // K rows: 4 bytes of padding move each row one bank on
  constexpr int kPairs = D / 2;
  __shared__ float q_s[kMaxGroup][D];
  __shared__ __align__(16) T k_s[kSlots * kPitch];
  __shared__ __align__(16) T v_s[kSlots * kPitch];
  __shared__ float p_s[kMaxGroup][kSlots];
  __shared__ float m_s[kMaxGroup], l_s[kMaxGroup], rescale_s[kMaxGroup];
  allow_dependents();
  dependency_wait();  // q, the caches and the length come from the kernels before
  const int split = blockIdx.x, splits = gridDim.x;
  const int64_t hk = blockIdx.y, b = blockIdx.z;
  const int G = int(a.q_heads / a.kv_heads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t filled = *a.length;
  const int64_t first = int64_t(split) * chunk;
  const int64_t end = first + chunk < filled ? first + chunk : filled;

  const T* q = static_cast<const T*>(a.q) + b * a.q_stride_b + hk * G * a.q_stride_h;
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    q_s[i / D][i % D] = Element<T>::to_float(q[(i / D) * a.q_stride_h + i % D]) * a.scale;
  }
  if (threadIdx.x < G) {
    m_s[threadIdx.x] = -INFINITY;
    l_s[threadIdx.x] = 0.0f;
  }
  // acc for this thread's (head, column pair) items: i = threadIdx.x + n * kThreads < G * kPairs.
  constexpr int kItems = (kMaxGroup * kPairs + kThreads - 1) / kThreads;
  float acc[kItems][2];
#pragma unroll
  for (int n = 0; n < kItems; ++n) acc[n][0] = acc[n][1] = 0.0f;

  const T* keys = static_cast<const T*>(a.key_cache) + b * a.k_stride_b + hk * a.k_stride_h;
  const T* values = static_cast<const T*>(a.value_cache) + b * a.v_stride_b + hk * a.v_stride_h;
  for (int64_t s0 = first; s0 < end; s0 += kSlots) {
    const int count = int(end - s0 < kSlots ? end - s0 : kSlots);
    __syncthreads();  // the previous group's k_s, v_s and p_s are consumed (and q_s, m_s are set)
    stage_rows<T, D, kSlots, VEC>(k_s, kPitch, keys + s0 * a.k_stride_s, a.k_stride_s, count);
    stage_rows<T, D, kSlots, VEC>(v_s, kPitch, values + s0 * a.v_stride_s, a.v_stride_s, count);
    __syncthreads();

    // Scores: lane = slot, warp over heads; then the head's max and sum across the warp.
    for (int g = warp; g < G; g += kWarps) {
      float score = -INFINITY;
      if (lane < count) {
        const T* k = k_s + lane * kPitch;
        float dot = 0.0f;
#pragma unroll 8
        for (int d = 0; d < D; d += 2) {
          const float2 kv = load_pair(k + d);
          const float2 qv = *reinterpret_cast<const float2*>(&q_s[g][d]);
          dot = fmaf(qv.x, kv.x, dot);
          dot = fmaf(qv.y, kv.y, dot);
        }
        score = dot + mask_term<T>(a, b, s0 + lane);
      }
      float m = score;
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, m);
      const float p = m_new == -INFINITY ? 0.0f : __expf(score - m_new);
      float l = p;
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) l += __shfl_xor_sync(0xffffffffu, l, offset);
      if (lane < kSlots) p_s[g][lane] = p;
      __syncwarp();
      if (lane == 0) {
        const float rescale = m_old == -INFINITY ? 0.0f : __expf(m_old - m_new);
        rescale_s[g] = rescale;
        l_s[g] = l_s[g] * rescale + l;
        m_s[g] = m_new;
      }
    }
    __syncthreads();

    // acc[g][d, d+1] = acc * rescale + sum_s p[g][s] * v[s][d, d+1] (lanes over column pairs:
    // consecutive 4-byte words of a V row, conflict-free; p broadcast).
#pragma unroll
    for (int n = 0; n < kItems; ++n) {
      const int i = threadIdx.x + n * kThreads;
      if (i < G * kPairs) {
        const int g = i / kPairs, d = (i % kPairs) * 2;
        const float rescale = rescale_s[g];
        float a0 = acc[n][0] * rescale, a1 = acc[n][1] * rescale;
        for (int s = 0; s < count; ++s) {
          const float2 v = load_pair(v_s + s * kPitch + d);
          const float p = p_s[g][s];
          a0 = fmaf(p, v.x, a0);
          a1 = fmaf(p, v.y, a1);
        }
        acc[n][0] = a0;
        acc[n][1] = a1;
      }
    }
  }
  __syncthreads();  // m_s, l_s final (also when this CTA had no slots)

  float* out = workspace + ((b * a.kv_heads + hk) * splits + split) * int64_t(G) * (D + 2);
#pragma unroll
  for (int n = 0; n < kItems; ++n) {
    const int i = threadIdx.x + n * kThreads;
    if (i < G * kPairs) {
      const int g = i / kPairs, d = (i % kPairs) * 2;
      *reinterpret_cast<float2*>(out + g * (D + 2) + d) = make_float2(acc[n][0], acc[n][1]);
    }
  }
  if (threadIdx.x < G) {
    out[threadIdx.x * (D + 2) + D] = m_s[threadIdx.x];
    out[threadIdx.x * (D + 2) + D + 1] = l_s[threadIdx.x];
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
decode_attention_combine_kernel(const DecodeAttentionArgs a, int splits, const float* __restrict__ workspace) {
  __shared__ float weight_s[kMaxGroup][kMaxSplits];
  allow_dependents();
  dependency_wait();  // the partials
  const int64_t hk = blockIdx.x, b = blockIdx.y;
  const int G = int(a.q_heads / a.kv_heads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* parts = workspace + (b * a.kv_heads + hk) * splits * int64_t(G) * (D + 2);
  auto m_of = [&](int j, int g) { return parts[(int64_t(j) * G + g) * (D + 2) + D]; };
  auto l_of = [&](int j, int g) { return parts[(int64_t(j) * G + g) * (D + 2) + D + 1]; };
  // Per head (a warp, lanes over the splits): M = max m_j, den = sum exp(m_j - M) l_j, weights.
  for (int g = warp; g < G; g += kWarps) {
    float m = -INFINITY;
    for (int j = lane; j < splits; j += 32) m = fmaxf(m, m_of(j, g));
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    float den = 0.0f;
    for (int j = lane; j < splits; j += 32) {
      const float mj = m_of(j, g);
      const float w = mj == -INFINITY ? 0.0f : __expf(mj - m);
      weight_s[g][j] = w;
      den = fmaf(w, l_of(j, g), den);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) den += __shfl_xor_sync(0xffffffffu, den, offset);
    const float inv = den > 0.0f ? 1.0f / den : 0.0f;  // a row with every slot excluded: zeros
    for (int j = lane; j < splits; j += 32) weight_s[g][j] *= inv;
  }
  __syncthreads();
  T* out = static_cast<T*>(a.out) + (b * a.q_heads + hk * G) * D;
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    float num = 0.0f;
#pragma unroll 4
    for (int j = 0; j < splits; ++j) num = fmaf(weight_s[g][j], parts[(int64_t(j) * G + g) * (D + 2) + d], num);
    out[int64_t(g) * D + d] = Element<T>::from_float(num);
  }
}

// Splits of the cache's slots: ~kTargetChunk slots a CTA, at most kMaxSplits (then longer chunks,
// which the partials kernel walks kSlots at a time).
int64_t decode_attention_cuda_splits(int64_t capacity) {
  return std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, ceil_div(capacity, kTargetChunk)));
}

// 16-byte loads of cache rows: base pointers 16-byte aligned and every stride a multiple of 8 elements.
bool rows_vectorizable(const DecodeAttentionArgs& a) {
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  auto whole = [](int64_t stride) { return stride % 8 == 0; };
  return aligned(a.key_cache) && aligned(a.value_cache) && whole(a.k_stride_b) && whole(a.k_stride_h) &&
         whole(a.k_stride_s) && whole(a.v_stride_b) && whole(a.v_stride_h) && whole(a.v_stride_s);
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
  const int64_t chunk = ceil_div(a.capacity, splits);
  if (chunk > INT32_MAX) return cudaErrorInvalidValue;
  const bool vec = rows_vectorizable(a);
  return dispatch_float_type(a.type, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // fp16 / bf16 only (the torch glue checks)
    } else {
      auto launch = [&](auto partials, auto combine) -> cudaError_t {
        cudaError_t status = launch_kernel(partials, dim3(unsigned(splits), unsigned(a.kv_heads), unsigned(a.batch)),
                                           dim3(kThreads), 0, stream, a, int(chunk), workspace);
        if (status != cudaSuccess) return status;
        return launch_kernel(combine, dim3(unsigned(a.kv_heads), unsigned(a.batch)), dim3(kThreads), 0, stream, a,
                             int(splits), static_cast<const float*>(workspace));
      };
#define QLORA_DECODE_ATTENTION(D)                                                                              \
  return vec ? launch(decode_attention_partials_kernel<T, D, true>, decode_attention_combine_kernel<T, D>)     \
             : launch(decode_attention_partials_kernel<T, D, false>, decode_attention_combine_kernel<T, D>)
      switch (a.head_dim) {
        case 64: QLORA_DECODE_ATTENTION(64);
        case 128: QLORA_DECODE_ATTENTION(128);
        case 256: QLORA_DECODE_ATTENTION(256);
        default: return cudaErrorInvalidValue;
      }
#undef QLORA_DECODE_ATTENTION
    }
  });
}

}  // namespace qlora
