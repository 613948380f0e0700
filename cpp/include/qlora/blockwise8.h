// 8-bit blockwise quantization against a sorted 256-entry code map (bitsandbytes' "dynamic" maps),
// used for double-quantized NF4 scales and for 8-bit optimizer state.
//
// Per block of `blocksize` consecutive elements: absmax = max|x| (fp32), and each element the
// index of the map entry nearest to x * (1 / absmax), ties to the lower index, after clamping the
// scaled value to [-1, 1]. Dequantize: x = map[q] * absmax[block].
#pragma once

#include <cstdint>

namespace qlora {

constexpr int kCodeMapSize = 256;

// Index of the entry of a sorted 256-entry map nearest to `scaled`: the number of the 255
// midpoints strictly below it. `midpoints` holds (map[i] + map[i+1]) / 2 for i < 255.
#if defined(__CUDACC__)
__host__ __device__ __forceinline__
#else
inline
#endif
int code8_of(float scaled, const float* midpoints) {
  int lo = 0;  // invariant: the answer is in [lo, lo + step * 2]
#pragma unroll
  for (int step = 128; step >= 1; step >>= 1) {
    const int probe = lo + step - 1;
    if (probe < 255 && scaled > midpoints[probe]) lo += step;
  }
  return lo;
}

// blocks [block_begin, block_end) of x - *offset (fp32, n elements; offset nullptr: 0) ->
// codes [n], absmax [n_blocks]. The subtraction is one fp32 rounding, as `x - offset` in torch.
void blockwise8_quantize_cpu(const float* x, int64_t n, const float* code_map, int64_t blocksize,
                             int64_t block_begin, int64_t block_end, uint8_t* codes,
                             float* absmax, const float* offset = nullptr);

// blocks [block_begin, block_end) of codes -> out (fp32, n elements).
void blockwise8_dequantize_cpu(const uint8_t* codes, const float* absmax, const float* code_map,
                               int64_t n, int64_t blocksize, int64_t block_begin,
                               int64_t block_end, float* out);

}  // namespace qlora
