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

#include "cuda_common.cuh"
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

// No __restrict__ on the data pointers: out may alias in.
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
    const T* x = in + int64_t(t) * op.in_stride_t + i;
    T* y = out + int64_t(t) * op.out_stride_t + i;
    const C* c = cos + int64_t(t) * a.head_dim + i;
    const C* s = sin + int64_t(t) * a.head_dim + i;
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
      if (!a.transpose) {
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
}

bool operand_aligned(const RopeOperand& op, int64_t elements, size_t element_bytes) {
  const uintptr_t bytes = uintptr_t(elements * int64_t(element_bytes));
  return is_aligned(op.in, bytes) && is_aligned(op.out, bytes) && op.in_stride_b % elements == 0 &&
         op.in_stride_h % elements == 0 && op.in_stride_t % elements == 0 &&
         op.out_stride_b % elements == 0 && op.out_stride_h % elements == 0 &&
         op.out_stride_t % elements == 0;
}

}  // namespace

cudaError_t rope_cuda(const RopeArgs& a, cudaStream_t stream) {
  const int64_t heads = a.q.heads + a.k.heads;
  if (a.batch == 0 || heads == 0 || a.seq == 0) return cudaSuccess;
  if (a.head_dim < 2 || a.head_dim % 2 != 0 || a.seq * (a.head_dim / 2) > INT_MAX ||
      a.batch * heads > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  return dispatch_float_type(a.type, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    auto launch = [&](auto table_tag) -> cudaError_t {
      using C = decltype(table_tag);
      constexpr int V = kVec16<T>;
      const int64_t half = a.head_dim / 2;
      const bool vector = half % V == 0 && operand_aligned(a.q, V, sizeof(T)) &&
                          operand_aligned(a.k, V, sizeof(T)) &&
                          is_aligned(a.cos, sizeof(C) * V) && is_aligned(a.sin, sizeof(C) * V);
      const int64_t items = a.seq * (vector ? half / V : half);
      const dim3 grid(unsigned(a.batch * heads),
                      unsigned(std::min(ceil_div(items, kThreads), kMaxGridY)));
      if (vector) {
        rope_kernel<T, C, V><<<grid, kThreads, 0, stream>>>(a);
      } else {
        rope_kernel<T, C, 1><<<grid, kThreads, 0, stream>>>(a);
      }
      return cudaGetLastError();
    };
    if (a.table_type == a.type) return launch(T{});
    if (a.table_type == FloatType::F32) return launch(float{});
    return cudaErrorInvalidValue;
  });
}

}  // namespace qlora
