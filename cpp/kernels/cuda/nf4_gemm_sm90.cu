// The kernel library's entry to the Hopper NF4 GEMM (nf4_gemm_sm90.cuh; design: docs/nf4_gemm_sm90.md). This file
// is compiled for sm_90a alone, in a library of its own (CMakeLists.txt: qlora_kernels_sm90), wherever the
// architecture list has 90: wgmma and TMA exist only in sm_90a code. Builds without it get the fallbacks in
// nf4_gemm_cuda.cu (nothing supported).
#include "nf4_gemm_sm90.cuh"
#include "qlora/kernels_cuda.h"

namespace qlora {
namespace {

sm90::NF4GemmArgs gemm_args(const void* x, int64_t M, int64_t K, const uint8_t* packed, const NF4Scales& scales,
                            int64_t N, const void* bias, void* y) {
  sm90::NF4GemmArgs args;
  args.x = static_cast<const __nv_bfloat16*>(x);
  args.packed = packed;
  args.absmax = scales.absmax;
  args.absmax_codes = scales.absmax_codes;
  args.nested_code = scales.nested_code;
  args.nested_absmax = scales.nested_absmax;
  args.nested_offset = scales.nested_offset;
  int nested_log2 = 0;
  while ((int64_t(1) << nested_log2) < scales.nested_blocksize && nested_log2 < 62) ++nested_log2;
  // A nested blocksize that is not a power of two has no log2: the kernel's covers() rejects -1.
  args.nested_log2 = (int64_t(1) << nested_log2) == scales.nested_blocksize ? nested_log2 : -1;
  args.bias = static_cast<const __nv_bfloat16*>(bias);
  args.y = static_cast<__nv_bfloat16*>(y);
  args.M = int(M);
  args.N = int(N);
  args.K = int(K);
  return args;
}

bool sizes_fit(FloatType type, int64_t M, int64_t N, int64_t K, int64_t blocksize) {
  // The kernel indexes with int: M * K, N * K / 2 and M * N stay below 2^31.
  constexpr int64_t kIntMax = (int64_t(1) << 31) - 1;
  return type == FloatType::BF16 && blocksize == 64 && M >= 1 && N >= 1 && K >= 1 && M * K <= kIntMax &&
         N * K <= kIntMax && M * N <= kIntMax;
}

}  // namespace

bool nf4_gemm_sm90_cuda_device_ready() { return sm90::detail::device_ready(); }

bool nf4_gemm_sm90_cuda_supported(FloatType type, int64_t M, int64_t N, int64_t K, int64_t blocksize,
                                  const NF4Scales& scales, const void* x, const uint8_t* packed) {
  // y is the caller's fresh allocation; its alignment is checked at launch. x stands in for it here.
  return sizes_fit(type, M, N, K, blocksize) &&
         sm90::nf4_gemm_sm90_covers(gemm_args(x, M, K, packed, scales, N, nullptr, const_cast<void*>(x)));
}

cudaError_t nf4_gemm_sm90_cuda(const void* x, FloatType type, int64_t M, int64_t K, const uint8_t* packed,
                               const NF4Scales& scales, int64_t blocksize, int64_t N, const void* bias, void* y,
                               cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (!sizes_fit(type, M, N, K, blocksize)) return cudaErrorInvalidValue;
  return sm90::nf4_gemm_sm90(gemm_args(x, M, K, packed, scales, N, bias, y), stream);
}

}  // namespace qlora
