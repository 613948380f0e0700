// Helpers shared by the CUDA kernel files: element-type traits and conversions, and the launch
// error check. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "qlora/float_types.h"

namespace qlora {
namespace cuda_detail {

template <typename T> struct Element;
template <> struct Element<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <> struct Element<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Element<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// max(|a|, b) that lets NaN through (fmaxf would drop it), so a NaN weight shows in absmax.
__device__ __forceinline__ float nan_propagating_absmax(float running, float v) {
  const float a = fabsf(v);
  return (a > running || a != a) ? a : running;
}

// max(|v|, running) that lets NaN through; one instruction on sm_80+ (max.NaN takes the abs as an
// operand modifier), a compare-select pair before.
__device__ __forceinline__ float max_abs_nan(float running, float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(running), "f"(fabsf(v)));
  return r;
#else
  return nan_propagating_absmax(running, v);
#endif
}

// max(a, b), NaN if either is NaN.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (b > a || b != b) ? b : a;
#endif
}

// Calls f.template operator()<T>() with T the CUDA element type of `type`.
template <typename F>
cudaError_t dispatch_float_type(FloatType type, F&& f) {
  switch (type) {
    case FloatType::F32: return f(float{});
    case FloatType::F16: return f(__half{});
    case FloatType::BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Store N floats (N a multiple of 8) to a 16-byte-aligned array of T as 16-byte vectors, converting
// with round-to-nearest-even. Register arrays are indexed with constants only (no local memory).
template <int N>
__device__ __forceinline__ void store_vectorized(float* dst, const float (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    *reinterpret_cast<float4*>(dst + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
  }
}
__device__ __forceinline__ uint32_t bits16(__half, float v) { return __half_as_ushort(__float2half_rn(v)); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16, float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return bits16(T{}, lo) | (bits16(T{}, hi) << 16);
}
template <int N, typename T>
__device__ __forceinline__ void store_vectorized(T* dst, const float (&v)[N]) {
  static_assert(sizeof(T) == 2, "16-bit element types only; float has its own overload");
#pragma unroll
  for (int i = 0; i < N; i += 8) {
    const uint4 packed = make_uint4(pack2<T>(v[i], v[i + 1]), pack2<T>(v[i + 2], v[i + 3]),
                                    pack2<T>(v[i + 4], v[i + 5]), pack2<T>(v[i + 6], v[i + 7]));
    *reinterpret_cast<uint4*>(dst + i) = packed;
  }
}

// Load 8 consecutive elements of T as floats; `vector` says the 8 lie in range and the address is
// 16-byte aligned (else each is loaded alone, and those at or past `n_left` read as 0).
template <typename T>
__device__ __forceinline__ void load8(const T* src, int64_t n_left, bool vector, float (&v)[8]) {
  if (vector) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(src));
      const float4 b = __ldg(reinterpret_cast<const float4*>(src) + 1);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (std::is_same_v<T, __half>) {
          v[2 * i] = Element<T>::to_float(__ushort_as_half(words[i] & 0xffffu));
          v[2 * i + 1] = Element<T>::to_float(__ushort_as_half(words[i] >> 16));
        } else {
          // bf16 is the top half of an fp32: one shift or mask per element.
          v[2 * i] = __uint_as_float(words[i] << 16);
          v[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
        }
      }
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = i < n_left ? Element<T>::to_float(src[i]) : 0.0f;
}

inline bool is_aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int log2_of_power_of_two(int64_t v) {
  int log2 = 0;
  while ((int64_t(1) << log2) < v) ++log2;
  return log2;
}

}  // namespace cuda_detail
}  // namespace qlora
