// NF4 quantize: fp32/fp16/bf16 weight -> packed 4-bit codes + fp32 absmax per block
// (math and rounding: qlora/nf4.h; the reciprocal is IEEE, never fast-math).
//
// Bytes: n*sizeof(T) read, n/2 + 4n/blocksize written (bf16, block 64: 2.56 n bytes).
// Instructions: ~25 per element (convert, abs-max, shuffles, reciprocal, multiply, cell, popcount,
// one shared-memory lookup, pack), so on the H100 issue and DRAM are nearly balanced: every
// instruction per element counts (see the cell lookup in qlora/nf4.h).
//
// Launch: each thread loads 8 consecutive elements (one 16-byte load for 16-bit types), so a
// quantization block is blocksize/8 threads. Up to block 256 (<= 32 threads) the block's absmax is
// a shuffle reduction inside a warp and a CTA of 256 threads covers 2048 elements; from 512 up a
// CTA is one quantization block (64..512 threads) reduced through shared memory. Each thread
// writes its 8 codes as one 32-bit word.
#include <type_traits>

#include "cuda_common.cuh"
#include "qlora/kernels_cuda.h"

namespace qlora {
namespace {

using namespace cuda_detail;

constexpr int kVec = 8;

template <int kLanes>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) {
    v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// max |v| over a vector: NaN if any element is NaN, else inf if one is inf.
__device__ __forceinline__ float vector_absmax(const float (&v)[kVec]) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) amax = max_abs_nan(amax, v[i]);
  return amax;
}

// Quantizes one 8-element vector per thread given its values, reducing absmax over the
// `threads_per_qblock` lanes that share a quantization block (<= 32: a shuffle reduction).
template <typename T>
__device__ __forceinline__ void quantize_vector(const float (&v)[kVec], int64_t first, int64_t n,
                                                int qblock_log2, float amax,
                                                const float* cells, uint8_t* packed,
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

// The cell midpoints, staged into shared memory by the first 32 threads of a CTA with one
// coalesced load (building them from constants in each thread cost ~170 instructions per thread,
// ~5 per element).
struct CellMidpoints {
  float values[kNF4Cells];
  constexpr CellMidpoints() : values{} {
    for (int i = 0; i < kNF4Cells; ++i) values[i] = nf4_cell_midpoint(i);
  }
};
__device__ const CellMidpoints kCellMidpoints{};

__device__ __forceinline__ void load_cells(float* cells) {
  if (threadIdx.x < kNF4Cells) cells[threadIdx.x] = kCellMidpoints.values[threadIdx.x];
}

// Blocks of <= 256 elements (<= 32 threads each). A thread handles kVectorsPerThread vectors spaced
// one CTA apart (coalesced), all loaded before the first is reduced, to keep loads in flight.
// kLanes = blocksize / 8 threads share a quantization block (a compile-time shuffle count).
template <typename T, int kVectorsPerThread, int kLanes>
__global__ void __launch_bounds__(256)
nf4_quantize_small_blocks_kernel(const T* __restrict__ x, int64_t n, bool aligned,
                                 uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  constexpr int kQBlockLog2 = kLanes == 4 ? 5 : kLanes == 8 ? 6 : kLanes == 16 ? 7 : 8;
  static_assert((kVec << (kQBlockLog2 - 3)) == kVec * kLanes, "kLanes must be 4, 8, 16 or 32");
  __shared__ float cells[kNF4Cells];
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
    amax = group_max<kLanes>(amax);  // all lanes take part, also those past n
    const int64_t first = (cta_first + j * blockDim.x + threadIdx.x) * kVec;
    quantize_vector<T>(v[j], first, n, kQBlockLog2, amax, cells, packed, absmax);
  }
}

// Blocks of 512..4096 elements: one CTA (64..512 threads) per block, reduced through shared memory.
template <typename T>
__global__ void __launch_bounds__(512)
nf4_quantize_large_blocks_kernel(const T* __restrict__ x, int64_t n, int qblock_log2, bool aligned,
                                 uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  __shared__ float cells[kNF4Cells];
  __shared__ float warp_max[16];
  load_cells(cells);
  const int64_t first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  const int64_t n_left = n - first;
  float v[kVec] = {};
  if (n_left > 0) load8(x + first, n_left, aligned && n_left >= kVec, v);
  float amax = group_max<32>(vector_absmax(v));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_max[warp] = amax;
  __syncthreads();  // also makes the cells visible
  if (warp == 0) {
    amax = group_max<32>(lane < int(blockDim.x / 32) ? warp_max[lane] : 0.0f);
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
// Measured on the H100 (bf16, block 64): 1 vector per thread beats 2 by 3% and 4 by 15% (more
// registers per thread cost occupancy; the loads in flight are enough either way).
#define QLORA_QUANT_VECTORS 1
#endif
      constexpr int kVectorsPerThread = QLORA_QUANT_VECTORS;
      const dim3 grid(unsigned(ceil_div(vectors, 256 * kVectorsPerThread)));
      auto launch = [&](auto lanes) {
        nf4_quantize_small_blocks_kernel<T, kVectorsPerThread, decltype(lanes)::value>
            <<<grid, 256, 0, stream>>>(src, n, aligned, packed, absmax);
      };
      switch (threads_per_qblock) {
        case 4: launch(std::integral_constant<int, 4>{}); break;
        case 8: launch(std::integral_constant<int, 8>{}); break;
        case 16: launch(std::integral_constant<int, 16>{}); break;
        default: launch(std::integral_constant<int, 32>{}); break;
      }
    } else {
      const int64_t grid = ceil_div(vectors, threads_per_qblock);
      nf4_quantize_large_blocks_kernel<T><<<dim3(unsigned(grid)), threads_per_qblock, 0, stream>>>(
          src, n, qblock_log2, aligned, packed, absmax);
    }
    return cudaGetLastError();
  });
}

}  // namespace qlora
