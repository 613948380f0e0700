// RMSNorm forward and backward over the last dimension (math: qlora/rms_norm.h).
//
//   forward:  r = 1/sqrt(mean(x^2) + eps);  y = w * X(x * r)  (or Y(w * x * r))
//   backward: dx = r * (g - n * mean(g * n)), g = dy * w, n = x * r;  dw = sum_rows dy * X(n)
//
// Bytes (rows x D, element sizes sx, sy, sw): forward reads x and writes y once,
// rows * D * (sx + sy) + D * sw + 4 * rows; backward reads dy and x and writes dx,
// rows * D * (sy + 2 sx), plus the dw partial sums (parts * D * 4 written and read again, parts
// <= kMaxBackwardBlocks). At Llama-8B shapes (2048 x 4096 bf16) that is 33.6 MB forward and
// 50 MB backward: ~11 us and ~17 us at the H100's ~3 TB/s copy bandwidth. FLOPs: ~4 per element
// forward, ~10 backward; memory-bound.
//
// Launch: 256 threads. A row belongs to a group of G threads: a warp (G = 32) when D <= 1024,
// so short rows (Qwen3's per-head q/k norms, D = 128) do not leave 7/8 of a CTA idle, else the
// whole CTA (G = 256). The forward keeps rows of up to 8192 columns in registers (read once, the
// weight row loaded before them: a decode step's one-row norm is one memory round trip, not
// two); longer rows, and the backward, are read twice (the sum of squares / the dot product, then
// the outputs), the second read hitting L1/L2. Sums are warp shuffles (+ shared
// memory across warps), in a fixed order: the result is deterministic. 16-byte vector accesses
// (8 elements) when D % 8 == 0 and every pointer is aligned, else one element per access.
//
// dw: a lane owns the same columns in every row it handles, so it accumulates them without
// atomics, in shared memory ([groups, D] fp32, <= 47 KB) or, for D > 12032, in its CTA's row of
// the global workspace. Each CTA writes one partial row [D]; a second kernel adds the partial rows
// in a fixed order (32 columns x 8 slices per CTA) and rounds to the weight's type. The backward
// grid is capped at kMaxBackwardBlocks so the partial sums stay small (4 MB at D = 4096).
#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"
#include "dependent_launch.cuh"
#include "qlora/kernels_cuda.h"
#include "vector_io.cuh"

namespace qlora {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kVec = 8;
constexpr int64_t kMaxBackwardBlocks = 256;
// Dynamic shared memory for the dw accumulators: the 48 KB a CTA gets without opting in, less
// room for the static reduction scratch.
constexpr int64_t kSmemLimitBytes = 47 * 1024;
constexpr int64_t kMaxGrid = int64_t(1) << 30;

int group_size(int64_t D) { return D <= 1024 ? 32 : kThreads; }

// Sum of v over the G threads of a group; every thread of the group gets the same bits (the
// butterfly adds the same pairs in every lane, and fp32 addition is commutative).
template <int G>
__device__ __forceinline__ float group_sum(float v, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if constexpr (G == 32) {
    return v;
  } else {
    static_assert(G == kThreads, "a group is a warp or the whole CTA");
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
    __syncthreads();  // scratch is reused by the next row
    return total;
  }
}

// Loads kStep elements at column c (kStep = kVec on the vector path, else 1).
template <int kStep, typename T>
__device__ __forceinline__ void load_step(const T* p, float (&v)[kStep]) {
  if constexpr (kStep == 1) {
    v[0] = Element<T>::to_float(p[0]);
  } else {
    load_vec<kStep>(p, v);
  }
}
template <int kStep, typename T>
__device__ __forceinline__ void store_step(T* p, const float (&v)[kStep]) {
  if constexpr (kStep == 1) {
    p[0] = Element<T>::from_float(v[0]);
  } else {
    store_vec<kStep>(p, v);
  }
}

// Steps of kStep columns a lane keeps in registers: a row of D <= G * kStep * kCachedSteps (up to
// 8192 on the vector path) is read from memory once and the weight row is loaded before the rows.
constexpr int kCachedSteps = 4;

template <typename X, typename W, typename Y, int G, int kStep>
__global__ void __launch_bounds__(kThreads)
rms_norm_forward_kernel(const X* __restrict__ x, const W* __restrict__ w, Y* __restrict__ y,
                        float* __restrict__ inv_rms, int64_t rows, int64_t D, float eps,
                        bool cast_before_weight) {
  __shared__ float scratch[kThreads / 32];
  constexpr int kGroups = kThreads / G;
  const int group = threadIdx.x / G, lane = threadIdx.x % G;
  allow_dependents();
  if (D <= int64_t(G) * kStep * kCachedSteps) {
    // The weight row is constant: a programmatic launch reads it before the wait, under the end of
    // the kernel before (dependent_launch.cuh).
    float wv[kCachedSteps][kStep];
#pragma unroll
    for (int s = 0; s < kCachedSteps; ++s) {
      const int64_t c = (int64_t(lane) + int64_t(s) * G) * kStep;
      if (c < D) load_step<kStep>(w + c, wv[s]);
    }
    dependency_wait();
    for (int64_t row = int64_t(blockIdx.x) * kGroups + group; row < rows; row += int64_t(gridDim.x) * kGroups) {
      const X* xr = x + row * D;
      Y* yr = y + row * D;
      float v[kCachedSteps][kStep];
      float sum = 0.0f;  // the loop path's order of additions: the same bits
#pragma unroll
      for (int s = 0; s < kCachedSteps; ++s) {
        const int64_t c = (int64_t(lane) + int64_t(s) * G) * kStep;
        if (c < D) {
          load_step<kStep>(xr + c, v[s]);
#pragma unroll
          for (int i = 0; i < kStep; ++i) sum += v[s][i] * v[s][i];
        }
      }
      sum = group_sum<G>(sum, scratch);
      const float inv = 1.0f / sqrtf(sum / float(D) + eps);
      if (lane == 0) inv_rms[row] = inv;
#pragma unroll
      for (int s = 0; s < kCachedSteps; ++s) {
        const int64_t c = (int64_t(lane) + int64_t(s) * G) * kStep;
        if (c < D) {
#pragma unroll
          for (int i = 0; i < kStep; ++i) {
            const float n = v[s][i] * inv;
            v[s][i] = wv[s][i] * (cast_before_weight ? round_to<X>(n) : n);
          }
          store_step<kStep>(yr + c, v[s]);
        }
      }
    }
    return;
  }
  dependency_wait();
  for (int64_t row = int64_t(blockIdx.x) * kGroups + group; row < rows;
       row += int64_t(gridDim.x) * kGroups) {
    const X* xr = x + row * D;
    Y* yr = y + row * D;
    float sum = 0.0f;
    for (int64_t c = int64_t(lane) * kStep; c < D; c += int64_t(G) * kStep) {
      float v[kStep];
      load_step<kStep>(xr + c, v);
#pragma unroll
      for (int i = 0; i < kStep; ++i) sum += v[i] * v[i];
    }
    sum = group_sum<G>(sum, scratch);
    const float inv = 1.0f / sqrtf(sum / float(D) + eps);
    if (lane == 0) inv_rms[row] = inv;
    for (int64_t c = int64_t(lane) * kStep; c < D; c += int64_t(G) * kStep) {
      float v[kStep], wv[kStep];
      load_step<kStep>(xr + c, v);
      load_step<kStep>(w + c, wv);
#pragma unroll
      for (int i = 0; i < kStep; ++i) {
        const float n = v[i] * inv;
        v[i] = wv[i] * (cast_before_weight ? round_to<X>(n) : n);
      }
      store_step<kStep>(yr + c, v);
    }
  }
}

template <typename X, typename W, typename Y, int G, int kStep>
__global__ void __launch_bounds__(kThreads)
rms_norm_backward_kernel(const Y* __restrict__ dy, const X* __restrict__ x,
                         const W* __restrict__ w, const float* __restrict__ inv_rms,
                         X* __restrict__ dx, float* __restrict__ partial, int64_t rows,
                         int64_t D, bool cast_before_weight, bool shared_accumulator) {
  __shared__ float scratch[kThreads / 32];
  extern __shared__ float shared_acc[];  // [kGroups, D] when shared_accumulator
  constexpr int kGroups = kThreads / G;
  const int group = threadIdx.x / G, lane = threadIdx.x % G;
  const bool dweight = partial != nullptr;
  // This lane's dw accumulators: its own columns of its group's row (shared or global).
  float* acc = shared_accumulator ? shared_acc + int64_t(group) * D
                                  : (dweight ? partial + int64_t(blockIdx.x) * D : nullptr);
  if (dweight) {
    for (int64_t c = int64_t(lane) * kStep; c < D; c += int64_t(G) * kStep) {
#pragma unroll
      for (int i = 0; i < kStep; ++i) acc[c + i] = 0.0f;
    }
  }
  for (int64_t row = int64_t(blockIdx.x) * kGroups + group; row < rows;
       row += int64_t(gridDim.x) * kGroups) {
    const Y* dyr = dy + row * D;
    const X* xr = x + row * D;
    X* dxr = dx + row * D;
    const float inv = inv_rms[row];
    float dot = 0.0f;
    for (int64_t c = int64_t(lane) * kStep; c < D; c += int64_t(G) * kStep) {
      float d[kStep], v[kStep], wv[kStep];
      load_step<kStep>(dyr + c, d);
      load_step<kStep>(xr + c, v);
      load_step<kStep>(w + c, wv);
#pragma unroll
      for (int i = 0; i < kStep; ++i) dot += (d[i] * wv[i]) * (v[i] * inv);
    }
    const float mean_dot = group_sum<G>(dot, scratch) / float(D);
    for (int64_t c = int64_t(lane) * kStep; c < D; c += int64_t(G) * kStep) {
      float d[kStep], v[kStep], wv[kStep];
      load_step<kStep>(dyr + c, d);
      load_step<kStep>(xr + c, v);
      load_step<kStep>(w + c, wv);
#pragma unroll
      for (int i = 0; i < kStep; ++i) {
        const float n = v[i] * inv;
        if (dweight) acc[c + i] += d[i] * (cast_before_weight ? round_to<X>(n) : n);
        v[i] = inv * (d[i] * wv[i] - n * mean_dot);
      }
      store_step<kStep>(dxr + c, v);
    }
  }
  if (dweight && shared_accumulator) {
    __syncthreads();
    for (int64_t c = threadIdx.x; c < D; c += kThreads) {
      float total = 0.0f;
#pragma unroll 1  // (unrolled, sm_90 spilled a register in the G = 32 variants)
      for (int g = 0; g < kGroups; ++g) total += shared_acc[int64_t(g) * D + c];
      partial[int64_t(blockIdx.x) * D + c] = total;
    }
  }
}

// dweight[c] = W(sum over parts p of partial[p, c]), in a fixed order: 8 slices of the parts per
// column (threadIdx.y), then the 8 slice sums.
constexpr int kSumColumns = 32, kSumSlices = 8;

template <typename W>
__global__ void __launch_bounds__(kSumColumns * kSumSlices)
column_sum_kernel(const float* __restrict__ partial, int64_t parts, int64_t D,
                  W* __restrict__ dweight) {
  __shared__ float slices[kSumSlices][kSumColumns + 1];
  const int64_t c = int64_t(blockIdx.x) * kSumColumns + threadIdx.x;
  float sum = 0.0f;
  if (c < D) {
    for (int64_t p = threadIdx.y; p < parts; p += kSumSlices) sum += partial[p * D + c];
  }
  slices[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < D) {
    float total = 0.0f;
#pragma unroll
    for (int s = 0; s < kSumSlices; ++s) total += slices[s][threadIdx.x];
    dweight[c] = Element<W>::from_float(total);
  }
}

// Calls f(X{}, W{}, Y{}) with W and Y each X or float (rms_norm_types_supported).
template <typename F>
cudaError_t dispatch_types(FloatType x_type, FloatType weight_type, FloatType y_type, F&& f) {
  if (!rms_norm_types_supported(x_type, weight_type, y_type)) return cudaErrorInvalidValue;
  return dispatch_float_type(x_type, [&](auto x) -> cudaError_t {
    using X = decltype(x);
    auto with_weight = [&](auto w) -> cudaError_t {
      return y_type == x_type ? f(x, w, X{}) : f(x, w, float{});
    };
    return weight_type == x_type ? with_weight(X{}) : with_weight(float{});
  });
}

template <int V>
using Int = std::integral_constant<int, V>;

// Calls f(Int<G>{}, Int<kStep>{}) for the row-group size and access width of this case.
template <typename F>
cudaError_t dispatch_shape(int64_t D, bool vector, F&& f) {
  if (group_size(D) == 32) return vector ? f(Int<32>{}, Int<kVec>{}) : f(Int<32>{}, Int<1>{});
  return vector ? f(Int<kThreads>{}, Int<kVec>{}) : f(Int<kThreads>{}, Int<1>{});
}

int64_t backward_blocks(int64_t rows, int64_t D) {
  return std::min(ceil_div(rows, kThreads / group_size(D)), kMaxBackwardBlocks);
}

}  // namespace

cudaError_t rms_norm_forward_cuda(const RMSNormForwardArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return dispatch_types(a.x_type, a.weight_type, a.y_type, [&](auto xt, auto wt, auto yt) {
    using X = decltype(xt);
    using W = decltype(wt);
    using Y = decltype(yt);
    const bool vector = a.D % kVec == 0 && is_aligned(a.x, sizeof(X) * kVec) &&
                        is_aligned(a.weight, sizeof(W) * kVec) && is_aligned(a.y, sizeof(Y) * kVec);
    return dispatch_shape(a.D, vector, [&](auto g, auto step) {
      constexpr int G = decltype(g)::value, kStep = decltype(step)::value;
      const int64_t grid = std::min(ceil_div(a.rows, kThreads / G), kMaxGrid);
      return launch_kernel(rms_norm_forward_kernel<X, W, Y, G, kStep>, dim3(unsigned(grid)), dim3(kThreads), 0, stream,
                           static_cast<const X*>(a.x), static_cast<const W*>(a.weight), static_cast<Y*>(a.y),
                           a.inv_rms, a.rows, a.D, a.eps, a.cast_before_weight);
    });
  });
}

int64_t rms_norm_backward_cuda_workspace(int64_t rows, int64_t D) {
  return rows == 0 ? 0 : backward_blocks(rows, D) * D;
}

cudaError_t rms_norm_backward_cuda(const RMSNormBackwardArgs& a, void* dweight, float* workspace,
                                   cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;  // the caller zero-fills dweight
  return dispatch_types(a.x_type, a.weight_type, a.y_type, [&](auto xt, auto wt, auto yt) {
    using X = decltype(xt);
    using W = decltype(wt);
    using Y = decltype(yt);
    const bool vector = a.D % kVec == 0 && is_aligned(a.dy, sizeof(Y) * kVec) &&
                        is_aligned(a.x, sizeof(X) * kVec) &&
                        is_aligned(a.weight, sizeof(W) * kVec) && is_aligned(a.dx, sizeof(X) * kVec);
    return dispatch_shape(a.D, vector, [&](auto g, auto step) -> cudaError_t {
      constexpr int G = decltype(g)::value, kStep = decltype(step)::value;
      constexpr int kGroups = kThreads / G;
      const bool with_dweight = dweight != nullptr;
      const int64_t grid = with_dweight ? backward_blocks(a.rows, a.D)
                                        : std::min(ceil_div(a.rows, kGroups), kMaxGrid);
      const int64_t shared_bytes = int64_t(kGroups) * a.D * int64_t(sizeof(float));
      // Groups of one CTA share its global partial row, so that fallback needs one group per
      // CTA: it does, since only D > 12032 misses the shared-memory limit, and then G = kThreads.
      const bool shared_accumulator = with_dweight && shared_bytes <= kSmemLimitBytes;
      if (with_dweight && !shared_accumulator && kGroups != 1) return cudaErrorInvalidValue;
      rms_norm_backward_kernel<X, W, Y, G, kStep>
          <<<dim3(unsigned(grid)), kThreads, shared_accumulator ? size_t(shared_bytes) : 0, stream>>>(
              static_cast<const Y*>(a.dy), static_cast<const X*>(a.x),
              static_cast<const W*>(a.weight), a.inv_rms, static_cast<X*>(a.dx),
              with_dweight ? workspace : nullptr, a.rows, a.D, a.cast_before_weight,
              shared_accumulator);
      cudaError_t status = cudaGetLastError();
      if (status != cudaSuccess || !with_dweight) return status;
      const dim3 sum_block(kSumColumns, kSumSlices);
      column_sum_kernel<W><<<dim3(unsigned(ceil_div(a.D, kSumColumns))), sum_block, 0, stream>>>(
          workspace, grid, a.D, static_cast<W*>(dweight));
      return cudaGetLastError();
    });
  });
}

}  // namespace qlora
