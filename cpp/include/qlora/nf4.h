// NF4 blockwise 4-bit quantization, bit-compatible with bitsandbytes (DESIGN.md §3).
//
// A weight of n elements is cut into consecutive blocks of `blocksize` elements of its row-major
// flattening (the last block may be partial). Each block stores absmax = max|x| in fp32, and each
// element the 4-bit index of the NF4 code nearest to x / absmax (ties to the lower code). Two codes
// share a byte, the even flat element in the high nibble; an odd n pads the last low nibble with
// code 7 (0.0). With double quantization the absmax vector is itself stored as 8-bit codes of a
// dynamic map (blockwise8.h) around an fp32 offset.
//
// This header is torch-free: plain pointers and sizes. CPU functions work on a range of blocks so
// that the caller can split the work over threads; CUDA entry points are in nf4_cuda.h.
#pragma once

#include <cstdint>

#include "qlora/float_types.h"

#if defined(__CUDACC__)
#define QLORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QLORA_HOST_DEVICE inline
#endif

namespace qlora {

// The 16 NF4 values, index = 4-bit code (bitsandbytes' literals, which are canonical). A function
// rather than an array so that device code can fold it (namespace-scope arrays are host-only).
struct NF4Table {
  float values[16] = {
      -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
      0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
};
QLORA_HOST_DEVICE constexpr float nf4_code(int i) { return NF4Table{}.values[i]; }

// Midpoints between neighbouring codes, computed in fp32 exactly as the reference does.
QLORA_HOST_DEVICE constexpr float nf4_midpoint(int i) { return (nf4_code(i) + nf4_code(i + 1)) / 2.0f; }

// Smallest absmax used as a divisor: an all-zero block then maps to code 7 (0.0) instead of NaN.
constexpr float kMinAbsmax = 1e-38f;

// Code of a scaled value in [-1, 1] = the number of midpoints strictly below it (a value exactly
// on a midpoint takes the lower code). Found in O(1): [-1, 1] is cut into 32 cells of 1/16, each
// holding at most one midpoint (neighbouring midpoints are >= 0.08 apart; the last cell holds
// none, so 1.0 and the ulp above it can join it), and the code is the count of midpoints below the
// cell plus one comparison with the cell's midpoint. The cell index (v + 1) * 16 is off by at most
// an ulp, and no midpoint lies within 1e-3 of a cell edge, so the cell is always right.
//
// Kernels keep the 32 midpoints in a table (32 floats: one per shared-memory bank, so a warp's
// lookups never conflict) and count the midpoints below a cell with a popcount of kNF4CellMask.
constexpr int kNF4Cells = 32;

// The midpoint inside `cell`, or +inf (above every value, so any input maps to a valid code) if
// the cell holds none.
QLORA_HOST_DEVICE constexpr float nf4_cell_midpoint(int cell) {
  const float lo = -1.0f + float(cell) / 16.0f, hi = -1.0f + float(cell + 1) / 16.0f;
  float midpoint = __builtin_huge_valf();
  for (int i = 0; i < 15; ++i) {
    const float m = nf4_midpoint(i);
    if (m >= lo && m < hi) midpoint = m;
  }
  return midpoint;
}

// Bit c is set when cell c holds a midpoint.
QLORA_HOST_DEVICE constexpr uint32_t nf4_cell_mask() {
  uint32_t mask = 0;
  for (int c = 0; c < kNF4Cells; ++c) mask |= (nf4_cell_midpoint(c) < 1.0f ? 1u : 0u) << c;
  return mask;
}
constexpr uint32_t kNF4CellMask = nf4_cell_mask();
static_assert(kNF4CellMask >> 31 == 0, "the last cell must hold no midpoint (1.0 joins it)");

// Cell of a scaled value: 0..31. Values below -1 (and NaN) go to cell 0, values from 31/16 - 1 up
// (1.0 and above included) to cell 31; both hold the right answer for them.
QLORA_HOST_DEVICE unsigned nf4_cell_of(float scaled) {
#if defined(__CUDA_ARCH__)
  // fma(v, 16, 16) rounds 16(v + 1) once, which is exactly (v + 1) * 16 (scaling by 16 is exact).
  // The conversion saturates (negative and NaN give 0), so one min finishes the clamp.
  return min(__float2uint_rz(fmaf(scaled, 16.0f, 16.0f)), unsigned(kNF4Cells - 1));
#else
  const float position = (scaled + 1.0f) * 16.0f;
  return position >= 0.0f ? unsigned(position < 31.0f ? position : 31.0f) : 0u;
#endif
}

// Midpoints below the lower edge of `cell`.
QLORA_HOST_DEVICE int nf4_cell_base(unsigned cell) {
  const uint32_t below = kNF4CellMask & ((1u << cell) - 1u);
#if defined(__CUDA_ARCH__)
  return __popc(below);
#else
  return __builtin_popcount(below);
#endif
}

// `cell_midpoints` holds nf4_cell_midpoint(c) for c = 0..31.
QLORA_HOST_DEVICE int nf4_code_of(float scaled, const float* cell_midpoints) {
  const unsigned cell = nf4_cell_of(scaled);
#if defined(__CUDA_ARCH__)
  // The count of midpoints below cell + 1 includes the cell's own: one popcount covers both
  // terms (cell + 1 <= 31 when it is taken, as the last cell holds no midpoint).
  return nf4_cell_base(cell + (scaled > cell_midpoints[cell] ? 1u : 0u));
#else
  return nf4_cell_base(cell) + (scaled > cell_midpoints[cell] ? 1 : 0);
#endif
}

// Where the per-block scales of an NF4 tensor come from.
struct NF4Scales {
  // Plain: fp32 absmax per block, [n_blocks].
  const float* absmax = nullptr;
  // Double-quantized (absmax == nullptr): 8-bit codes per block [n_blocks], the 256-entry dynamic
  // map, fp32 scales per group of `nested_blocksize` blocks, and a pointer to the fp32 offset.
  const uint8_t* absmax_codes = nullptr;
  const float* nested_code = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_offset = nullptr;
  int64_t nested_blocksize = 256;
};

// The scale of block b, rounded exactly as bitsandbytes' dequantize: the 8-bit product and the
// offset addition are two separate fp32 roundings (never an FMA).
QLORA_HOST_DEVICE float nf4_block_scale(const NF4Scales& s, int64_t b) {
  if (s.absmax != nullptr) return s.absmax[b];
#if defined(__CUDA_ARCH__)
  const float product = __fmul_rn(__ldg(s.nested_code + s.absmax_codes[b]),
                                  __ldg(s.nested_absmax + b / s.nested_blocksize));
  return __fadd_rn(product, __ldg(s.nested_offset));
#else
  // The CPU kernels build with -ffp-contract=off, so these stay two roundings.
  const float product = s.nested_code[s.absmax_codes[b]] * s.nested_absmax[b / s.nested_blocksize];
  return product + *s.nested_offset;
#endif
}

// Largest M (rows of x) of the tiled NF4 GEMM (nf4_gemm_cuda's mma kernel); above it the op takes the Hopper
// kernel where it applies, else a dequantized weight and a dense GEMM (the 4-bit read no longer dominates).
constexpr int64_t kNF4GemmMaxRows = 256;

// Quantize blocks [block_begin, block_end) of x (n elements of `type`). Writes the bytes of those
// blocks in `packed` [(n+1)/2] and their absmax [n_blocks]. absmax is NaN for a block holding NaN
// and +inf for one holding only finite values and inf, so the caller can reject such weights.
void nf4_quantize_cpu(const void* x, FloatType type, int64_t n, int64_t blocksize,
                      int64_t block_begin, int64_t block_end, uint8_t* packed, float* absmax);

// Dequantize blocks [block_begin, block_end) into out (n elements of `type`).
void nf4_dequantize_cpu(const uint8_t* packed, const NF4Scales& scales, int64_t n,
                        int64_t blocksize, int64_t block_begin, int64_t block_end, void* out,
                        FloatType type);

// y[m, n] = sum_k x[m, k] * deq(W)[n, k] (+ bias[n]) for output rows n in [n_begin, n_end) and
// every m < M. x: fp32 [M, K] (the caller converts); W [N, K] as packed codes + scales, each value
// rounded to `type` as nf4_dequantize stores it; bias [N] and y [M, N] of `type` (bias may be
// nullptr). Sums in fp32, rounded to `type` once.
void nf4_gemv_cpu(const float* x, int64_t M, int64_t K, const uint8_t* packed,
                  const NF4Scales& scales, int64_t blocksize, int64_t N, int64_t n_begin,
                  int64_t n_end, const void* bias, void* y, FloatType type);

}  // namespace qlora
