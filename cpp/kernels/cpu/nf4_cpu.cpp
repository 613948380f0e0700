// NF4 quantize / dequantize on the CPU (math and layout: qlora/nf4.h).
//
// Work is split by the caller into ranges of whole blocks (at::parallel_for in the torch glue);
// blocks are >= 32 elements, so a range owns whole bytes of `packed` and threads never share one.
// Dequantize scales the 16-entry codebook once per block, so each element costs one table load and
// one store; the product code*absmax is formed in fp32 exactly as the reference rounds it.
#include <algorithm>
#include <cmath>

#include "qlora/nf4.h"

namespace qlora {
namespace {

struct CellMidpoints {
  float values[kNF4Cells];
  constexpr CellMidpoints() : values{} {
    for (int i = 0; i < kNF4Cells; ++i) values[i] = nf4_cell_midpoint(i);
  }
};
constexpr CellMidpoints kCellMidpoints{};
constexpr NF4Table kCodes{};

template <typename Load>
void quantize_blocks(Load load, int64_t n, int64_t blocksize, int64_t block_begin,
                     int64_t block_end, uint8_t* packed, float* absmax) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    float amax = 0.0f;
    bool has_nan = false;
    for (int64_t i = begin; i < end; ++i) {
      const float v = load(i);
      has_nan |= std::isnan(v);
      amax = std::max(amax, std::fabs(v));
    }
    if (has_nan) amax = NAN;
    absmax[b] = amax;
    const float inv = 1.0f / std::max(amax, kMinAbsmax);
    auto code_at = [&](int64_t i) -> uint8_t {
      if (i >= end) return 7;  // padding nibble of an odd n: the code of 0.0
      const float scaled = std::min(1.0f, std::max(-1.0f, load(i) * inv));
      return static_cast<uint8_t>(nf4_code_of(scaled, kCellMidpoints.values));
    };
    for (int64_t i = begin; i < end; i += 2) {
      packed[i / 2] = static_cast<uint8_t>((code_at(i) << 4) | code_at(i + 1));
    }
  }
}

template <typename Store>
void dequantize_blocks(Store store, const uint8_t* packed, const NF4Scales& scales, int64_t n,
                       int64_t blocksize, int64_t block_begin, int64_t block_end) {
  float table[16];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const float scale = nf4_block_scale(scales, b);
    for (int c = 0; c < 16; ++c) table[c] = kCodes.values[c] * scale;
    const int64_t begin = b * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const int64_t pair_end = begin + ((end - begin) & ~int64_t(1));
    for (int64_t i = begin; i < pair_end; i += 2) {
      const uint8_t byte = packed[i / 2];
      store(i, table[byte >> 4]);
      store(i + 1, table[byte & 0x0f]);
    }
    if (pair_end < end) store(pair_end, table[packed[pair_end / 2] >> 4]);
  }
}

}  // namespace

void nf4_quantize_cpu(const void* x, FloatType type, int64_t n, int64_t blocksize,
                      int64_t block_begin, int64_t block_end, uint8_t* packed, float* absmax) {
  switch (type) {
    case FloatType::F32: {
      const float* p = static_cast<const float*>(x);
      quantize_blocks([p](int64_t i) { return p[i]; }, n, blocksize, block_begin, block_end,
                      packed, absmax);
      break;
    }
    case FloatType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(x);
      quantize_blocks([p](int64_t i) { return f16_to_float(p[i]); }, n, blocksize, block_begin,
                      block_end, packed, absmax);
      break;
    }
    case FloatType::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(x);
      quantize_blocks([p](int64_t i) { return bf16_to_float(p[i]); }, n, blocksize, block_begin,
                      block_end, packed, absmax);
      break;
    }
  }
}

void nf4_dequantize_cpu(const uint8_t* packed, const NF4Scales& scales, int64_t n,
                        int64_t blocksize, int64_t block_begin, int64_t block_end, void* out,
                        FloatType type) {
  switch (type) {
    case FloatType::F32: {
      float* o = static_cast<float*>(out);
      dequantize_blocks([o](int64_t i, float v) { o[i] = v; }, packed, scales, n, blocksize,
                        block_begin, block_end);
      break;
    }
    case FloatType::F16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      dequantize_blocks([o](int64_t i, float v) { o[i] = float_to_f16(v); }, packed, scales, n,
                        blocksize, block_begin, block_end);
      break;
    }
    case FloatType::BF16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      dequantize_blocks([o](int64_t i, float v) { o[i] = float_to_bf16(v); }, packed, scales, n,
                        blocksize, block_begin, block_end);
      break;
    }
  }
}

}  // namespace qlora
