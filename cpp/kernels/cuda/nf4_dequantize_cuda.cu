// NF4 dequantize: packed 4-bit codes + per-block scales -> fp32/fp16/bf16 (math: qlora/nf4.h).
//
//   out[i] = T(nf4[code(i)] * scale(i / blocksize)),  scale = absmax, or for double quantization
//   fp32(map8[q] * absmax2[b / 256]) + offset (two roundings, as bitsandbytes).
//
// Bytes: n/2 (codes) + n/blocksize (8-bit or 4n/blocksize fp32 scales) read, n*sizeof(T) written:
// 2.52 n bytes for bf16 at block 64 with double quantization. Memory-bound: the target is the
// device's copy bandwidth. FLOPs: one multiply per element.
//
// Launch: the output is cut into 16-byte segments (8 elements of a 16-bit type, 4 of fp32), each
// fed by 4 (or 2) bytes of codes. A thread handles kSegmentsPerThread segments spaced one CTA
// apart, so every warp-wide load and store is contiguous (full 32-byte sectors) and each thread
// has all its code loads in flight before the first use. blocksize >= 32 > segment, so a segment
// has one scale. The NF4 table lives in shared memory (16 entries, no bank conflicts). Segments
// past the last whole one, or an unaligned pointer, take a scalar path.
//
// Rows: out may hold W's rows (row_elements each) at a larger stride (row_stride elements), W
// then being the left part of a wider matrix (the LoRA unit's [W | B] for one GEMM with K + r).
// A segment then never straddles two rows (row_elements and row_stride multiples of a segment,
// else the scalar path), and its row is found by a multiply and shift (RowDivider), not a division.
#include "cuda_common.cuh"
#include "qlora/kernels_cuda.h"

namespace qlora {
namespace {

using namespace cuda_detail;

#ifndef QLORA_DEQUANT_THREADS
#define QLORA_DEQUANT_THREADS 256
#endif
constexpr int kThreads = QLORA_DEQUANT_THREADS;
#ifndef QLORA_DEQUANT_SEGMENTS
#define QLORA_DEQUANT_SEGMENTS 4
#endif
constexpr int kSegmentsPerThread = QLORA_DEQUANT_SEGMENTS;

template <typename T> struct Segment {
  static constexpr int kElements = 16 / sizeof(T);  // outputs per 16-byte store
  static constexpr int kCodeBytes = kElements / 2;   // 4 for 16-bit types, 2 for fp32
  using CodeWord = std::conditional_t<kCodeBytes == 4, uint32_t, uint16_t>;
};

// q = v / d for 0 <= v < 2^31 as (v * multiplier) >> shift, multiplier = ceil(2^shift / d) and
// shift = 31 + ceil(log2 d): the rounding error m*d - 2^shift < d <= 2^(shift-31) keeps the
// quotient exact below 2^31 (the round-up method; Granlund & Montgomery 1994).
struct RowDivider {
  uint64_t multiplier;
  int shift;
  static RowDivider of(uint32_t d) {
    int log2_ceil = 0;
    while ((uint64_t(1) << log2_ceil) < d) ++log2_ceil;
    const int shift = 31 + log2_ceil;
    return {((uint64_t(1) << shift) + d - 1) / d, shift};
  }
  __device__ __forceinline__ uint32_t divide(uint32_t v) const {
    return uint32_t((uint64_t(v) * multiplier) >> shift);
  }
};

// Where element `i` of W (row-major, row_elements a row) lives in out (rows row_stride apart).
struct RowLayout {
  int64_t row_elements, row_stride;
  RowDivider segments_per_row;  // divides a segment index by row_elements / segment
  __device__ __forceinline__ int64_t offset_of_segment(int64_t seg, int elements) const {
    const int64_t row = segments_per_row.divide(uint32_t(seg));
    return row * row_stride + (seg * elements - row * row_elements);
  }
  __device__ __forceinline__ int64_t offset_of_element(int64_t i) const {
    const int64_t row = i / row_elements;
    return row * row_stride + (i - row * row_elements);
  }
};

template <typename T, bool kRows>
__global__ void __launch_bounds__(kThreads)
nf4_dequantize_kernel(const uint8_t* __restrict__ packed, NF4Scales scales, int64_t n,
                      int blocksize_log2, bool vector_ok, RowLayout rows, T* __restrict__ out) {
  using Seg = Segment<T>;
  __shared__ float table[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    if (threadIdx.x == i) table[i] = nf4_code(i);  // constant index: folds to an immediate
  }
  __syncthreads();

  const int64_t whole_segments = vector_ok ? n / Seg::kElements : 0;
  const int64_t cta_first = int64_t(blockIdx.x) * kThreads * kSegmentsPerThread;
  typename Seg::CodeWord words[kSegmentsPerThread];
#pragma unroll
  for (int j = 0; j < kSegmentsPerThread; ++j) {
    const int64_t seg = cta_first + j * kThreads + threadIdx.x;
    words[j] = seg < whole_segments
                   ? __ldg(reinterpret_cast<const typename Seg::CodeWord*>(packed) + seg)
                   : 0;
  }
#pragma unroll
  for (int j = 0; j < kSegmentsPerThread; ++j) {
    const int64_t seg = cta_first + j * kThreads + threadIdx.x;
    const int64_t first = seg * Seg::kElements;
    if (seg < whole_segments) {
      const float scale = nf4_block_scale(scales, first >> blocksize_log2);
      float values[Seg::kElements];
#pragma unroll
      for (int byte = 0; byte < Seg::kCodeBytes; ++byte) {
        const uint32_t b = (uint32_t(words[j]) >> (8 * byte)) & 0xffu;
        values[2 * byte] = table[b >> 4] * scale;
        values[2 * byte + 1] = table[b & 0x0fu] * scale;
      }
      const int64_t at = kRows ? rows.offset_of_segment(seg, Seg::kElements) : first;
      store_vectorized<Seg::kElements>(out + at, values);
    } else if (first < n) {
      // Scalar path: the ragged tail, or everything when a pointer is not 16-byte aligned.
      const int64_t last = min(n, first + Seg::kElements);
      const float scale = nf4_block_scale(scales, first >> blocksize_log2);
      for (int64_t i = first; i < last; ++i) {
        const uint8_t b = packed[i / 2];
        const uint8_t code = (i & 1) ? (b & 0x0fu) : (b >> 4);
        out[kRows ? rows.offset_of_element(i) : i] = Element<T>::from_float(table[code] * scale);
      }
    }
  }
}

}  // namespace

cudaError_t nf4_dequantize_rows_cuda(const uint8_t* packed, const NF4Scales& scales, int64_t n,
                                     int64_t blocksize, int64_t row_elements, int64_t row_stride,
                                     void* out, FloatType type, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (row_elements <= 0 || row_stride < row_elements || n % row_elements != 0) {
    return cudaErrorInvalidValue;
  }
  const int blocksize_log2 = log2_of_power_of_two(blocksize);
  const bool strided = row_stride != row_elements;
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kElements = Segment<T>::kElements;
    // strided rows: whole segments inside each row, and segment indices below 2^31 (RowDivider)
    const bool vector_ok = is_aligned(packed, 16) && is_aligned(out, 16) &&
                           (!strided || (row_elements % kElements == 0 &&
                                         row_stride % kElements == 0 &&
                                         n / kElements < (int64_t(1) << 31)));
    const RowLayout rows{row_elements, row_stride,
                         RowDivider::of(uint32_t(strided && vector_ok ? row_elements / kElements : 1))};
    const int64_t segments = ceil_div(n, kElements);
    const int64_t grid = ceil_div(segments, int64_t(kThreads) * kSegmentsPerThread);
    if (strided) {
      nf4_dequantize_kernel<T, true><<<dim3(unsigned(grid)), kThreads, 0, stream>>>(
          packed, scales, n, blocksize_log2, vector_ok, rows, static_cast<T*>(out));
    } else {
      nf4_dequantize_kernel<T, false><<<dim3(unsigned(grid)), kThreads, 0, stream>>>(
          packed, scales, n, blocksize_log2, vector_ok, rows, static_cast<T*>(out));
    }
    return cudaGetLastError();
  });
}

cudaError_t nf4_dequantize_cuda(const uint8_t* packed, const NF4Scales& scales, int64_t n,
                                int64_t blocksize, void* out, FloatType type,
                                cudaStream_t stream) {
  return nf4_dequantize_rows_cuda(packed, scales, n, blocksize, n > 0 ? n : 1, n > 0 ? n : 1, out,
                                  type, stream);
}

}  // namespace qlora
