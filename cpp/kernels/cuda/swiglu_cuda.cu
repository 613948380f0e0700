// SwiGLU forward and backward, elementwise (math: qlora/swiglu.h).
//
//   forward:  h = g * sigmoid(g) * u
//   backward: dg = dh * u * s * (1 + g * (1 - s)),  du = dh * g * s,  s = sigmoid(g)
//
// Bytes per element: forward 3 * sizeof(T) (g, u read, h written), backward 5 * sizeof(T) (dh, g,
// u read, dg, du written). Llama-8B MLP shapes (2048 tokens x 14336, bf16): 176 MB forward, 294 MB
// backward: ~59 us and ~99 us at the H100's ~3 TB/s. FLOPs: ~5 (forward) and ~10 (backward) per
// element plus one exp; memory-bound.
//
// Launch: 256 threads, grid-stride over 16-byte vectors (8 elements of a 16-bit type, 4 of fp32)
// when every pointer is 16-byte aligned, the tail and unaligned arrays one element per access.
// The math (expf, not __expf) is swiglu_math.cuh's, shared with DoRA's fused gate/up backward
// (dora_cuda.cu). The backward may write dg over g and du over u: each thread reads
// its elements before writing them, so the pointers carry no __restrict__.
//
// Scaled operands (DoRA, qlora/swiglu.h): g = T(gate * gate_scale[col]), u likewise, col = i %
// columns; the 16-byte path then also needs columns % V == 0 (a vector never straddles a row) and
// aligned scales. Forward bytes per element stay 3 * sizeof(T) (the scales are L1/L2-resident):
// what it saves is DoRA's two c ⊙ z passes (4 * sizeof(T) per element) before the plain kernel.
#include <algorithm>

#include "cuda_common.cuh"
#include "dependent_launch.cuh"
#include "qlora/kernels_cuda.h"
#include "swiglu_math.cuh"
#include "vector_io.cuh"

namespace qlora {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = int64_t(1) << 20;

// The column (i % columns) of a grid-stride loop's element i, carried from one iteration to the
// next by an add and a compare: the 64-bit remainder (a subroutine call) runs once per thread,
// not once per element. Unscaled kernels carry nothing.
template <bool Scaled>
struct ColumnCursor {
  int64_t col = 0, step = 0, columns = 1;

  __device__ __forceinline__ ColumnCursor(int64_t first, int64_t stride, int64_t columns_) {
    if constexpr (Scaled) {
      columns = columns_;
      col = first % columns;
      step = stride % columns;
    }
  }
  // Element i + offset's column (offset >= 0, small: within one vector).
  __device__ __forceinline__ int64_t at(int64_t offset) const {
    if constexpr (!Scaled) return 0;
    int64_t c = col + offset;
    while (c >= columns) c -= columns;
    return c;
  }
  __device__ __forceinline__ void advance() {
    if constexpr (Scaled) {
      col += step;
      if (col >= columns) col -= columns;
    }
  }
};

// The V operands of elements [i, i + V) as the SwiGLU sees them: scaled (rounded to T) if Scaled;
// `col`: element i's column (the V elements share a row: columns % V == 0 on this path).
template <typename T, int V, bool Scaled>
__device__ __forceinline__ void scale_vec(float (&v)[V], const T* scale, int64_t col) {
  if constexpr (Scaled) {
    float c[V];
    load_vec<V>(scale + col, c);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = round_to<T>(v[j] * c[j]);
  }
}

template <typename T, bool Scaled>
__device__ __forceinline__ float operand(const T* values, const T* scale, int64_t k, int64_t col) {
  const float v = Element<T>::to_float(values[k]);
  if constexpr (Scaled) {
    return round_to<T>(v * Element<T>::to_float(scale[col]));
  } else {
    return v;
  }
}

template <typename T, int V, bool Scaled>
__global__ void __launch_bounds__(kThreads)
swiglu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ h,
                      int64_t n, const T* __restrict__ gate_scale, const T* __restrict__ up_scale,
                      int64_t columns) {
  allow_dependents();
  dependency_wait();  // gate and up come from the kernel before (dependent_launch.cuh)
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  ColumnCursor<Scaled> cursor(first * V, stride * V, columns);
  for (int64_t v = first; v * V < n; v += stride, cursor.advance()) {
    const int64_t i = v * V;
    if (V > 1 && i + V <= n) {
      float g[V], u[V];
      load_vec<V>(gate + i, g);
      load_vec<V>(up + i, u);
      scale_vec<T, V, Scaled>(g, gate_scale, cursor.col);
      scale_vec<T, V, Scaled>(u, up_scale, cursor.col);
#pragma unroll
      for (int j = 0; j < V; ++j) g[j] = swiglu(g[j], u[j]);
      store_vec<V>(h + i, g);
    } else {
      for (int64_t k = i; k < n && k < i + V; ++k) {
        const int64_t col = cursor.at(k - i);
        h[k] = Element<T>::from_float(swiglu(operand<T, Scaled>(gate, gate_scale, k, col),
                                             operand<T, Scaled>(up, up_scale, k, col)));
      }
    }
  }
}

template <typename T, int V, bool Scaled>
__global__ void __launch_bounds__(kThreads)
swiglu_backward_kernel(const T* dh, const T* gate, const T* up, T* dgate, T* dup, int64_t n,
                       const T* __restrict__ gate_scale, const T* __restrict__ up_scale,
                       int64_t columns) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  ColumnCursor<Scaled> cursor(first * V, stride * V, columns);
  for (int64_t v = first; v * V < n; v += stride, cursor.advance()) {
    const int64_t i = v * V;
    if (V > 1 && i + V <= n) {
      float d[V], g[V], u[V];
      load_vec<V>(dh + i, d);
      load_vec<V>(gate + i, g);
      load_vec<V>(up + i, u);
      scale_vec<T, V, Scaled>(g, gate_scale, cursor.col);
      scale_vec<T, V, Scaled>(u, up_scale, cursor.col);
#pragma unroll
      for (int j = 0; j < V; ++j) swiglu_grad(d[j], g[j], u[j], g[j], u[j]);
      store_vec<V>(dgate + i, g);
      store_vec<V>(dup + i, u);
    } else {
      for (int64_t k = i; k < n && k < i + V; ++k) {
        const int64_t col = cursor.at(k - i);
        float dg, du;
        swiglu_grad(Element<T>::to_float(dh[k]), operand<T, Scaled>(gate, gate_scale, k, col),
                    operand<T, Scaled>(up, up_scale, k, col), dg, du);
        dgate[k] = Element<T>::from_float(dg);
        dup[k] = Element<T>::from_float(du);
      }
    }
  }
}

int64_t grid_for(int64_t n, int vector) {
  return std::max<int64_t>(1, std::min(ceil_div(ceil_div(n, vector), kThreads), kMaxGrid));
}

}  // namespace

// Both launchers: the 16-byte path where every pointer allows it (and, scaled, a row holds whole
// vectors), one element per access otherwise.
cudaError_t swiglu_forward_cuda(const void* gate, const void* up, void* h, int64_t n,
                                FloatType type, cudaStream_t stream, SwiGLUScales scales) {
  if (n == 0) return cudaSuccess;
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec16<T>;
    const auto* g = static_cast<const T*>(gate);
    const auto* u = static_cast<const T*>(up);
    const auto* gs = static_cast<const T*>(scales.gate);
    const auto* us = static_cast<const T*>(scales.up);
    auto* out = static_cast<T*>(h);
    const bool scaled = gs != nullptr;
    const bool vector = is_aligned(gate, 16) && is_aligned(up, 16) && is_aligned(h, 16) &&
                        (!scaled || (scales.columns % V == 0 && is_aligned(gs, 16) && is_aligned(us, 16)));
    const int64_t c = scales.columns;
    const dim3 grid(unsigned(grid_for(n, vector ? V : 1)));
    auto launch = [&](auto kernel) {
      return launch_kernel(kernel, grid, dim3(kThreads), 0, stream, g, u, out, n, gs, us, c);
    };
    if (vector) return scaled ? launch(swiglu_forward_kernel<T, V, true>) : launch(swiglu_forward_kernel<T, V, false>);
    return scaled ? launch(swiglu_forward_kernel<T, 1, true>) : launch(swiglu_forward_kernel<T, 1, false>);
  });
}

cudaError_t swiglu_backward_cuda(const void* dh, const void* gate, const void* up, void* dgate,
                                 void* dup, int64_t n, FloatType type, cudaStream_t stream,
                                 SwiGLUScales scales) {
  if (n == 0) return cudaSuccess;
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec16<T>;
    const auto* d = static_cast<const T*>(dh);
    const auto* g = static_cast<const T*>(gate);
    const auto* u = static_cast<const T*>(up);
    const auto* gs = static_cast<const T*>(scales.gate);
    const auto* us = static_cast<const T*>(scales.up);
    auto* dg = static_cast<T*>(dgate);
    auto* du = static_cast<T*>(dup);
    const bool scaled = gs != nullptr;
    const bool vector = is_aligned(dh, 16) && is_aligned(gate, 16) && is_aligned(up, 16) &&
                        is_aligned(dgate, 16) && is_aligned(dup, 16) &&
                        (!scaled || (scales.columns % V == 0 && is_aligned(gs, 16) && is_aligned(us, 16)));
    const int64_t c = scales.columns;
    if (vector) {
      const dim3 grid(unsigned(grid_for(n, V)));
      if (scaled) swiglu_backward_kernel<T, V, true><<<grid, kThreads, 0, stream>>>(d, g, u, dg, du, n, gs, us, c);
      else swiglu_backward_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(d, g, u, dg, du, n, gs, us, c);
    } else {
      const dim3 grid(unsigned(grid_for(n, 1)));
      if (scaled) swiglu_backward_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(d, g, u, dg, du, n, gs, us, c);
      else swiglu_backward_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(d, g, u, dg, du, n, gs, us, c);
    }
    return cudaGetLastError();
  });
}

}  // namespace qlora
