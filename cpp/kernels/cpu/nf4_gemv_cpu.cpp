// NF4 GEMV / skinny GEMM on the CPU (math: qlora/nf4.h, nf4_gemv_cpu).
//
// For each output row n of the caller's range: dequantize W[n, :] into a float buffer, rounded to
// the output type exactly as nf4_dequantize stores it (the CUDA "mma" variant's weight; the
// contract, nf4_gemv_cuda.cu, only asks for W held at least to T's precision), then dot it with every row of x (fp32, 8
// partial sums so the loop vectorises without reassociation flags). Blocks may straddle rows (K
// need not be a multiple of the block size): every element finds its block from its flat index.
#include <algorithm>
#include <vector>

#include "qlora/nf4.h"

namespace qlora {
namespace {

constexpr NF4Table kCodes{};

// W[n, :] dequantized and rounded to `type`, as floats.
void dequantize_row(const uint8_t* packed, const NF4Scales& scales, int64_t blocksize, int64_t K,
                    int64_t n, FloatType type, float* row) {
  const int64_t first = n * K;
  int64_t k = 0;
  while (k < K) {
    const int64_t block = (first + k) / blocksize;
    const int64_t block_end = std::min(K, (block + 1) * blocksize - first);
    const float scale = nf4_block_scale(scales, block);
    for (; k < block_end; ++k) {
      const int64_t i = first + k;
      const uint8_t byte = packed[i / 2];
      const float v = kCodes.values[(i & 1) ? (byte & 0x0f) : (byte >> 4)] * scale;
      switch (type) {
        case FloatType::F32: row[k] = v; break;
        case FloatType::F16: row[k] = f16_to_float(float_to_f16(v)); break;
        case FloatType::BF16: row[k] = bf16_to_float(float_to_bf16(v)); break;
      }
    }
  }
}

float dot(const float* a, const float* b, int64_t K) {
  constexpr int kLanes = 8;
  float partial[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) partial[l] += a[k + l] * b[k + l];
  }
  for (; k < K; ++k) partial[0] += a[k] * b[k];
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += partial[l];
  return sum;
}

void store(void* y, FloatType type, int64_t i, float v) {
  switch (type) {
    case FloatType::F32: static_cast<float*>(y)[i] = v; break;
    case FloatType::F16: static_cast<uint16_t*>(y)[i] = float_to_f16(v); break;
    case FloatType::BF16: static_cast<uint16_t*>(y)[i] = float_to_bf16(v); break;
  }
}

}  // namespace

void nf4_gemv_cpu(const float* x, int64_t M, int64_t K, const uint8_t* packed,
                  const NF4Scales& scales, int64_t blocksize, int64_t N, int64_t n_begin,
                  int64_t n_end, const void* bias, void* y, FloatType type) {
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t n = n_begin; n < n_end; ++n) {
    dequantize_row(packed, scales, blocksize, K, n, type, row.data());
    const float b = bias != nullptr ? load_as_float(bias, type, n) : 0.0f;
    for (int64_t m = 0; m < M; ++m) store(y, type, m * N + n, dot(x + m * K, row.data(), K) + b);
  }
}

}  // namespace qlora
