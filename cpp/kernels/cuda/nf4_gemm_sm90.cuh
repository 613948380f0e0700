// NF4 GEMM for large M on Hopper (sm_90a): Y[m, n] = sum_k X[m, k] W[n, k] (+ bias[n]), W dequantized inside the
// kernel. Design and measurements: docs/nf4_gemm_sm90.md. The library calls it through nf4_gemm_sm90.cu (nf4_gemm
// from nf4_gemm_sm90_min_rows() rows; the Python route for 65-1,024 rows where its tiles fill the GPU);
// benchmarks/gpu_checks/nf4_gemm_sm90_check.cu checks and times it alone, against cuBLAS.
//
// Interface. Everything the kernel reads is a plain device pointer; the weight is the library's NF4 layout
// (bitsandbytes' byte order: byte b of a row holds k = 2b in its high nibble and 2b + 1 in its low one),
// blocksize 64, double-quantized (absmax == nullptr) or plain fp32 absmax.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace qlora {
namespace sm90 {

struct NF4GemmArgs {
  const __nv_bfloat16* x = nullptr;      // [M, K] row-major, 16-byte aligned
  const uint8_t* packed = nullptr;       // [N, K / 2] NF4 codes, 16-byte aligned
  const float* absmax = nullptr;         // plain scales [N * K / 64]; nullptr: double quantization below
  const uint8_t* absmax_codes = nullptr; // [N * K / 64] 8-bit codes of the block scales
  const float* nested_code = nullptr;    // [256] the dynamic map
  const float* nested_absmax = nullptr;  // [ceil(N * K / 64 / 2^nested_log2)]
  const float* nested_offset = nullptr;  // [1]
  int nested_log2 = 8;                   // log2 of the nested blocksize (blocks of 64 per nested scale)
  const __nv_bfloat16* bias = nullptr;   // [N] or nullptr
  __nv_bfloat16* y = nullptr;            // [M, N] row-major, 16-byte aligned; y = T(sum + bias), one rounding
  int M = 0, N = 0, K = 0;
};

// Whether this device and these sizes are covered: compute capability 9.0, a build with sm_90a code and the driver's
// tensor-map encoder; K % 64 == 0 (one quantization block a pipeline stage), N % 8 == 0 (16-byte output stores),
// M, N, K > 0, aligned x, packed and y, and the double-quantization pointers where absmax is null.
inline bool nf4_gemm_sm90_covers(const NF4GemmArgs& args);

// Launches on `stream`. cudaErrorInvalidValue where nf4_gemm_sm90_covers is false.
inline cudaError_t nf4_gemm_sm90(const NF4GemmArgs& args, cudaStream_t stream);

}  // namespace sm90
}  // namespace qlora

#include "nf4_gemm_sm90_impl.cuh"
