// RoPE of q and k in one launch (math and layout: qlora/rope.h).
//
//   out[i]        = x[i] * c[i] - x[i + half] * s[i]
//   out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half]      (transpose: signs swap)
//
// Products and sums are __fmul_rn / __fadd_rn (no FMA contraction), so an fp32 result equals
// PyTorch's `q * cos + rotate_half(q) * sin` in fp32 bit for bit, and a 16-bit one is that value
// rounded once.
//
// Bytes: q and k read and written once, 2 * (B * (Hq + Hk) * T * Dh) * sizeof(T), plus the tables
// (B' * T * Dh * 2 * sizeof(C), read once per head from L2). Llama-8B shapes (B*T = 2048, 32 + 8
// heads, Dh = 128, bf16): 42 MB, ~14 us at the H100's ~3 TB/s. FLOPs: 3 per element.
//
// Launch: 256 threads; blockIdx.x = (b, head) over q's heads then k's, so the row base and the
// table batch are per-CTA values; blockIdx.y (grid-stride) over that head's T x half/V work items.
// An item is V consecutive pairs (i, i + half) of one row: 16-byte vector accesses (V = 8 for
// 16-bit types, 4 for fp32) when half % V == 0 and every base pointer and stride is aligned,
// else V = 1. Consecutive threads take consecutive items of a row, then the next row: coalesced
// for both [B, H, T, Dh] and [B, T, H, Dh] storage. In place is safe: a thread reads its pairs
// before writing them, and no other thread touches them.
#include <algorithm>
#include <climits>
#include <cstdio>

#include "cuda_common.cuh"
#include "dependent_launch.cuh"
#include "qlora/kernels_cuda.h"
#include "vector_io.cuh"

namespace qlora {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <int V, typename T>
__device__ __forceinline__ void load_n(const T* p, float (&v)[V]) {
  if constexpr (V == 1) {
    v[0] = Element<T>::to_float(p[0]);
  } else {
    load_vec<V>(p, v);
  }
}
template <int V, typename T>
__device__ __forceinline__ void store_n(T* p, const float (&v)[V]) {
  if constexpr (V == 1) {
    p[0] = Element<T>::from_float(v[0]);
  } else {
    store_vec<V>(p, v);
  }
}

// V consecutive pairs (i, i + half) of one row: x -> y (y may be x), tables c, s at the row's
// position. No __restrict__: out may alias in.
template <typename T, typename C, int V>
__device__ __forceinline__ void rotate_pairs(const T* x, T* y, const C* c, const C* s, int half,
                                             bool transpose) {
  float x1[V], x2[V], c1[V], c2[V], s1[V], s2[V];
  load_n<V>(x, x1);
  load_n<V>(x + half, x2);
  load_n<V>(c, c1);
  load_n<V>(c + half, c2);
  load_n<V>(s, s1);
  load_n<V>(s + half, s2);
  float y1[V], y2[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (!transpose) {
      y1[j] = __fsub_rn(__fmul_rn(x1[j], c1[j]), __fmul_rn(x2[j], s1[j]));
      y2[j] = __fadd_rn(__fmul_rn(x2[j], c2[j]), __fmul_rn(x1[j], s2[j]));
    } else {
      y1[j] = __fadd_rn(__fmul_rn(x1[j], c1[j]), __fmul_rn(x2[j], s2[j]));
      y2[j] = __fsub_rn(__fmul_rn(x2[j], c2[j]), __fmul_rn(x1[j], s1[j]));
    }
  }
  store_n<V>(y, y1);
  store_n<V>(y + half, y2);
}

template <typename T, typename C, int V>
__global__ void __launch_bounds__(kThreads) rope_kernel(const RopeArgs a) {
  const int64_t heads = a.q.heads + a.k.heads;
  const int64_t b = int64_t(blockIdx.x) / heads;
  int64_t h = int64_t(blockIdx.x) % heads;
  const bool is_q = h < a.q.heads;
  if (!is_q) h -= a.q.heads;
  const RopeOperand op = is_q ? a.q : a.k;
  const T* in = static_cast<const T*>(op.in) + b * op.in_stride_b + h * op.in_stride_h;
  T* out = static_cast<T*>(op.out) + b * op.out_stride_b + h * op.out_stride_h;
  const int64_t table_base = (a.cos_batch == 1 ? 0 : b) * a.seq * a.head_dim;
  const C* cos = static_cast<const C*>(a.cos) + table_base;
  const C* sin = static_cast<const C*>(a.sin) + table_base;
  const int half = int(a.head_dim / 2);
  const unsigned items_per_row = unsigned(half / V);
  const unsigned items = unsigned(a.seq) * items_per_row;  // < 2^31, checked at launch
  for (unsigned item = blockIdx.y * kThreads + threadIdx.x; item < items;
       item += gridDim.y * kThreads) {
    const unsigned t = item / items_per_row;
    const int i = int(item - t * items_per_row) * V;
    rotate_pairs<T, C, V>(in + int64_t(t) * op.in_stride_t + i, out + int64_t(t) * op.out_stride_t + i,
                          cos + int64_t(t) * a.head_dim + i, sin + int64_t(t) * a.head_dim + i, half,
                          a.transpose);
  }
}

// rope_append_kv_ (qlora/rope.h). Work items, grid-stride: V pairs of a q row (rotated in place),
// then V pairs of a k row (rotated into key_cache at slot P + t), then V elements of a v row
// (copied into value_cache at slot P + t); rows in (b, h, t) order; < 2^31 items (32-bit index
// math: a decode step's cost is its latency). Every thread reads P before the loop; with
// `advance` (a one-CTA launch) the barrier after the loop orders those reads before thread 0
// writes P + T.
constexpr int kAppendThreads = 512;

template <typename T, typename C, int V>
__global__ void __launch_bounds__(kAppendThreads) rope_append_kv_kernel(const RopeAppendArgs a, bool advance) {
  allow_dependents();
  dependency_wait();  // q, k, v, the tables and the length come from earlier kernels (dependent_launch.cuh)
  const RopeArgs& r = a.rope;
  const int64_t slot0 = *a.length;
  if (slot0 < 0 || slot0 + r.seq > a.capacity) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      printf("qlora_ext::rope_append_kv_: the cache is full: length %lld + %lld new tokens > %lld slots\n",
             (long long)slot0, (long long)r.seq, (long long)a.capacity);
    }
    __trap();
  }
  const unsigned half = unsigned(r.head_dim / 2), seq = unsigned(r.seq);
  const unsigned rot_per_row = half / V, v_per_row = unsigned(a.v_dim / V);
  const unsigned q_heads = unsigned(r.q.heads), k_heads = unsigned(r.k.heads);
  const unsigned q_rows = unsigned(r.batch) * q_heads * seq, k_rows = unsigned(r.batch) * k_heads * seq;
  const unsigned rot_items = (q_rows + k_rows) * rot_per_row;
  const unsigned items = rot_items + k_rows * v_per_row;  // v has k's heads
  for (unsigned item = blockIdx.x * blockDim.x + threadIdx.x; item < items; item += gridDim.x * blockDim.x) {
    if (item < rot_items) {
      unsigned row = item / rot_per_row;
      const unsigned i = (item - row * rot_per_row) * V;
      const bool is_q = row < q_rows;
      if (!is_q) row -= q_rows;
      const RopeOperand& op = is_q ? r.q : r.k;
      const unsigned heads = is_q ? q_heads : k_heads;
      const unsigned t = row % seq, bh = row / seq;
      const int64_t h = bh % heads, b = bh / heads;
      const int64_t slot = is_q ? int64_t(t) : slot0 + t;
      const T* x = static_cast<const T*>(op.in) + b * op.in_stride_b + h * op.in_stride_h + t * op.in_stride_t + i;
      T* y = static_cast<T*>(op.out) + b * op.out_stride_b + h * op.out_stride_h + slot * op.out_stride_t + i;
      const int64_t table = ((r.cos_batch == 1 ? 0 : b) * r.seq + t) * r.head_dim + i;
      rotate_pairs<T, C, V>(x, y, static_cast<const C*>(r.cos) + table, static_cast<const C*>(r.sin) + table,
                            int(half), false);
    } else {
      const unsigned rest = item - rot_items;
      const unsigned row = rest / v_per_row;
      const unsigned i = (rest - row * v_per_row) * V;
      const unsigned t = row % seq, bh = row / seq;
      const int64_t h = bh % k_heads, b = bh / k_heads;
      const T* x = static_cast<const T*>(a.v) + b * a.v_stride_b + h * a.v_stride_h + t * a.v_stride_t + i;
      T* y = static_cast<T*>(a.value_cache) + b * a.value_cache_stride_b + h * a.value_cache_stride_h +
             (slot0 + t) * a.value_cache_stride_t + i;
      float v[V];
      load_n<V>(x, v);
      store_n<V>(y, v);
    }
  }
  if (advance) {
    __syncthreads();
    if (threadIdx.x == 0) *a.length = slot0 + r.seq;
  }
}

__global__ void advance_length_kernel(int64_t* length, int64_t by) { *length += by; }

bool operand_aligned(const RopeOperand& op, int64_t elements, size_t element_bytes) {
  const uintptr_t bytes = uintptr_t(elements * int64_t(element_bytes));
  return is_aligned(op.in, bytes) && is_aligned(op.out, bytes) && op.in_stride_b % elements == 0 &&
         op.in_stride_h % elements == 0 && op.in_stride_t % elements == 0 &&
         op.out_stride_b % elements == 0 && op.out_stride_h % elements == 0 &&
         op.out_stride_t % elements == 0;
}

// Whether the rotation of `a` may take V-wide vector accesses (tables of type C): every row's
// halves, both operands and both tables aligned to V elements.
template <typename T, typename C, int V>
bool rope_vectorizable(const RopeArgs& a) {
  return (a.head_dim / 2) % V == 0 && operand_aligned(a.q, V, sizeof(T)) && operand_aligned(a.k, V, sizeof(T)) &&
         is_aligned(a.cos, sizeof(C) * V) && is_aligned(a.sin, sizeof(C) * V);
}

// f(T{}, C{}) with T the element type of q and k and C the tables': T or float.
template <typename F>
cudaError_t dispatch_rope_types(const RopeArgs& a, F&& f) {
  return dispatch_float_type(a.type, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (a.table_type == a.type) return f(T{}, T{});
    if (a.table_type == FloatType::F32) return f(T{}, float{});
    return cudaErrorInvalidValue;
  });
}

bool aligned_rows(const void* p, int64_t stride_b, int64_t stride_h, int64_t stride_t, int64_t elements,
                  size_t element_bytes) {
  return is_aligned(p, uintptr_t(elements * int64_t(element_bytes))) && stride_b % elements == 0 &&
         stride_h % elements == 0 && stride_t % elements == 0;
}

// A step of at most this many work items runs as one CTA, which also advances *length: a decode
// step (Llama-8B: 448 items) is one launch, one item a thread.
constexpr int64_t kOneBlockItems = 8 * kAppendThreads;

}  // namespace

cudaError_t rope_append_kv_cuda(const RopeAppendArgs& a, cudaStream_t stream) {
  const RopeArgs& r = a.rope;
  if (a.length == nullptr || r.head_dim < 2 || r.head_dim % 2 != 0 || a.v_dim < 1) return cudaErrorInvalidValue;
  const int64_t rows = r.batch * r.k.heads * r.seq;
  if (r.seq == 0) return cudaSuccess;
  if (r.batch == 0 || (r.q.heads == 0 && r.k.heads == 0)) {
    advance_length_kernel<<<1, 1, 0, stream>>>(a.length, r.seq);  // nothing to write; the count still moves
    return cudaGetLastError();
  }
  return dispatch_rope_types(r, [&](auto tag, auto table_tag) -> cudaError_t {
    using T = decltype(tag);
    using C = decltype(table_tag);
    constexpr int V = kVec16<T>;
    const int64_t half = r.head_dim / 2;
    const bool vector = rope_vectorizable<T, C, V>(r) && a.v_dim % V == 0 &&
                        aligned_rows(a.v, a.v_stride_b, a.v_stride_h, a.v_stride_t, V, sizeof(T)) &&
                        aligned_rows(a.value_cache, a.value_cache_stride_b, a.value_cache_stride_h,
                                     a.value_cache_stride_t, V, sizeof(T));
    const int64_t width = vector ? V : 1;
    const int64_t items = (r.batch * r.q.heads * r.seq + rows) * (half / width) + rows * (a.v_dim / width);
    if (items >= (int64_t(1) << 31)) return cudaErrorInvalidValue;  // the kernel's 32-bit item index
    const bool one_block = items <= kOneBlockItems;
    const dim3 grid(unsigned(one_block ? 1 : std::min<int64_t>(ceil_div(items, kAppendThreads), 65535)));
    const dim3 block(unsigned(std::min<int64_t>(kAppendThreads, ceil_div(items, 32) * 32)));
    cudaError_t status = vector ? launch_kernel(rope_append_kv_kernel<T, C, V>, grid, block, 0, stream, a, one_block)
                                : launch_kernel(rope_append_kv_kernel<T, C, 1>, grid, block, 0, stream, a, one_block);
    if (status == cudaSuccess && !one_block) {
      advance_length_kernel<<<1, 1, 0, stream>>>(a.length, r.seq);
      status = cudaGetLastError();
    }
    return status;
  });
}

cudaError_t rope_cuda(const RopeArgs& a, cudaStream_t stream) {
  const int64_t heads = a.q.heads + a.k.heads;
  if (a.batch == 0 || heads == 0 || a.seq == 0) return cudaSuccess;
  if (a.head_dim < 2 || a.head_dim % 2 != 0 || a.seq * (a.head_dim / 2) > INT_MAX ||
      a.batch * heads > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  return dispatch_rope_types(a, [&](auto tag, auto table_tag) -> cudaError_t {
    using T = decltype(tag);
    using C = decltype(table_tag);
    constexpr int V = kVec16<T>;
    const int64_t half = a.head_dim / 2;
    const bool vector = rope_vectorizable<T, C, V>(a);
    const int64_t items = a.seq * (vector ? half / V : half);
    const dim3 grid(unsigned(a.batch * heads),
                    unsigned(std::min(ceil_div(items, kThreads), kMaxGridY)));
    if (vector) {
      rope_kernel<T, C, V><<<grid, kThreads, 0, stream>>>(a);
    } else {
      rope_kernel<T, C, 1><<<grid, kThreads, 0, stream>>>(a);
    }
    return cudaGetLastError();
  });
}

}  // namespace qlora
