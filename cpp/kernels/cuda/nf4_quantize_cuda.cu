// NF4 quantize: fp32/fp16/bf16 weight -> packed 4-bit codes + fp32 absmax per block
// (math and rounding: qlora/nf4.h; the reciprocal is IEEE, never fast-math).
//
// Bytes: n*sizeof(T) read, n/2 + 4n/blocksize written (bf16, block 64: 2.56 n bytes).
// FLOPs: ~10 per element (abs, max, multiply, clamp, cell lookup); memory-bound.
//
// Launch: each thread loads 8 consecutive elements (one 16-byte load for 16-bit types), so a
// quantization block is blocksize/8 threads. Up to block 256 (<= 32 threads) the block's absmax is
// a shuffle reduction inside a warp and a CTA of 256 threads covers 2048 elements; from 512 up a
// CTA is one quantization block (64..512 threads) reduced through shared memory. Each thread
// writes its 8 codes as one 32-bit word.
#include <utility>

#include "cuda_common.cuh"
#include "qlora/kernels_cuda.h"

namespace qlora {
namespace {

using namespace cuda_detail;

constexpr int kVec = 8;

__device__ __forceinline__ float group_max(float v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = (other > v || other != other) ? other : v;
  }
  return v;
}

// max |v| over a vector, NaN if any element is NaN (inf if one is inf): fmaxf drops NaN, so NaN and
// inf are tracked apart by v * 0 (NaN for both), one FMA per element instead of a compare chain.
__device__ __forceinline__ float vector_absmax(const float (&v)[kVec]) {
  float amax = 0.0f, poison = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    amax = fmaxf(amax, fabsf(v[i]));
    poison = fmaf(v[i], 0.0f, poison);
  }
  return (poison != poison && amax != INFINITY) ? NAN : amax;
}

// Quantizes one 8-element vector per thread given its values, reducing absmax over the
// `threads_per_qblock` lanes that share a quantization block (<= 32: a shuffle reduction).
template <typename T>
__device__ __forceinline__ void quantize_vector(const float (&v)[kVec], int64_t first, int64_t n,
                                                int qblock_log2, float amax,
                                                const NF4Cell* cells, uint8_t* packed,
                                                float* absmax) {
  const int64_t n_left = n - first;
  if (n_left <= 0) return;
  // Shifts, not 64-bit division: a runtime int64 divide is a long subroutine on the GPU.
  if ((first & ((int64_t(1) << qblock_log2) - 1)) == 0) absmax[first >> qblock_log2] = amax;
  const float inv = 1.0f / fmaxf(amax, kMinAbsmax);
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float scaled = v[i] * inv;  // in [-1, 1] up to an ulp; nf4_code_of handles the rest
    // Elements past n (odd tail) have v = 0 and so take code 7, the padding bitsandbytes uses.
    const uint32_t code = uint32_t(nf4_code_of(scaled, cells));
    // Byte j of the word holds elements 2j (high nibble) and 2j+1 (low nibble).
    word |= code << ((i / 2) * 8 + ((i & 1) ? 0 : 4));
  }
  if (n_left >= kVec) {
    *reinterpret_cast<uint32_t*>(packed + first / 2) = word;
  } else {
    const int64_t bytes = (n_left + 1) / 2;
    for (int64_t j = 0; j < bytes; ++j) packed[first / 2 + j] = uint8_t(word >> (8 * j));
  }
}

// The cell table as compile-time constants (a constexpr array built from an index pack: calling
// nf4_cell(i) in an unrolled loop instead left ~500 compares per thread in the prologue).
template <int... I>
__device__ __forceinline__ void load_cells(NF4Cell* cells, std::integer_sequence<int, I...>) {
  constexpr NF4Cell kTable[] = {nf4_cell(I)...};
  ((threadIdx.x == I ? (void)(cells[I] = kTable[I]) : (void)0), ...);
}
__device__ __forceinline__ void load_cells(NF4Cell* cells) {
  load_cells(cells, std::make_integer_sequence<int, kNF4Cells>{});
}

// Blocks of <= 256 elements (<= 32 threads each). A thread handles kVectorsPerThread vectors spaced
// one CTA apart (coalesced), all loaded before the first is reduced, to keep loads in flight.
template <typename T, int kVectorsPerThread>
__global__ void __launch_bounds__(256)
nf4_quantize_small_blocks_kernel(const T* __restrict__ x, int64_t n, int threads_per_qblock,
                                 int qblock_log2, bool aligned, uint8_t* __restrict__ packed,
                                 float* __restrict__ absmax) {
  __shared__ NF4Cell cells[kNF4Cells];
  load_cells(cells);
  const int64_t cta_first = int64_t(blockIdx.x) * blockDim.x * kVectorsPerThread;
  float v[kVectorsPerThread][kVec];
#pragma unroll
  for (int j = 0; j < kVectorsPerThread; ++j) {
    const int64_t first = (cta_first + j * blockDim.x + threadIdx.x) * kVec;
    const int64_t n_left = n - first;
    if (n_left > 0) {
      load8(x + first, n_left, aligned && n_left >= kVec, v[j]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[j][i] = 0.0f;
    }
  }
  __syncthreads();  // cells visible
#pragma unroll
  for (int j = 0; j < kVectorsPerThread; ++j) {
    float amax = vector_absmax(v[j]);
    amax = group_max(amax, threads_per_qblock);  // all lanes take part, also those past n
    const int64_t first = (cta_first + j * blockDim.x + threadIdx.x) * kVec;
    quantize_vector<T>(v[j], first, n, qblock_log2, amax, cells, packed, absmax);
  }
}

// Blocks of 512..4096 elements: one CTA (64..512 threads) per block, reduced through shared memory.
template <typename T>
__global__ void __launch_bounds__(512)
nf4_quantize_large_blocks_kernel(const T* __restrict__ x, int64_t n, int qblock_log2, bool aligned,
                                 uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  __shared__ NF4Cell cells[kNF4Cells];
  __shared__ float warp_max[16];
  load_cells(cells);
  const int64_t first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  const int64_t n_left = n - first;
  float v[kVec] = {};
  if (n_left > 0) load8(x + first, n_left, aligned && n_left >= kVec, v);
  float amax = group_max(vector_absmax(v), 32);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_max[warp] = amax;
  __syncthreads();  // also makes the cells visible
  if (warp == 0) {
    amax = group_max(lane < int(blockDim.x / 32) ? warp_max[lane] : 0.0f, 32);
    if (lane == 0) warp_max[0] = amax;
  }
  __syncthreads();
  quantize_vector<T>(v, first, n, qblock_log2, warp_max[0], cells, packed, absmax);
}

}  // namespace

cudaError_t nf4_quantize_cuda(const void* x, FloatType type, int64_t n, int64_t blocksize,
                              uint8_t* packed, float* absmax, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  // packed + first/2 is 4-byte aligned for every vector; x + first is 16-byte aligned if x is.
  if (!is_aligned(packed, 4)) return cudaErrorMisalignedAddress;
  const bool aligned = is_aligned(x, 16);
  const int threads_per_qblock = int(blocksize / kVec);
  const int qblock_log2 = log2_of_power_of_two(blocksize);
  const int64_t vectors = ceil_div(n, kVec);
  return dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(x);
    if (threads_per_qblock <= 32) {
#ifndef QLORA_QUANT_VECTORS
#define QLORA_QUANT_VECTORS 4
#endif
      constexpr int kVectorsPerThread = QLORA_QUANT_VECTORS;
      const int64_t grid = ceil_div(vectors, 256 * kVectorsPerThread);
      nf4_quantize_small_blocks_kernel<T, kVectorsPerThread><<<dim3(unsigned(grid)), 256, 0, stream>>>(
          src, n, threads_per_qblock, qblock_log2, aligned, packed, absmax);
    } else {
      const int64_t grid = ceil_div(vectors, threads_per_qblock);
      nf4_quantize_large_blocks_kernel<T><<<dim3(unsigned(grid)), threads_per_qblock, 0, stream>>>(
          src, n, qblock_log2, aligned, packed, absmax);
    }
    return cudaGetLastError();
  });
}

}  // namespace qlora
