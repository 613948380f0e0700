// V consecutive elements of T loaded as floats and stored from floats in one vector access per
// 16 bytes (V * sizeof(T) bytes, aligned to that size). Plain loads (not __ldg): the callers
// include in-place kernels that write what they read. Register arrays are indexed with
// constants only. Torch-free.
#pragma once

#include "cuda_common.cuh"

namespace qlora {
namespace cuda_detail {

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = Element<T>::to_float(pack.v[i]);
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.v[i] = Element<T>::from_float(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

// Elements per 16-byte access.
template <typename T>
constexpr int kVec16 = int(16 / sizeof(T));

// Rounds an fp32 value to T and back (what storing to T and loading again gives).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return Element<T>::to_float(Element<T>::from_float(v));
}

}  // namespace cuda_detail
}  // namespace qlora
