// 8-bit blockwise quantize / dequantize on the CPU (math: qlora/blockwise8.h). The caller splits
// the work into ranges of whole blocks.
#include <algorithm>
#include <cmath>

#include "qlora/blockwise8.h"
#include "qlora/nf4.h"

namespace qlora {

namespace {

template <typename Load>
void quantize_blocks(Load load, int64_t n, const float* code_map, int64_t blocksize,
                     int64_t block_begin, int64_t block_end, uint8_t* codes, float* absmax) {
  float midpoints[kCodeMapSize - 1];
  for (int i = 0; i < kCodeMapSize - 1; ++i) midpoints[i] = (code_map[i] + code_map[i + 1]) / 2.0f;
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
    absmax[b] = has_nan ? NAN : amax;
    const float inv = 1.0f / std::max(amax, kMinAbsmax);
    for (int64_t i = begin; i < end; ++i) {
      const float scaled = std::min(1.0f, std::max(-1.0f, load(i) * inv));
      codes[i] = static_cast<uint8_t>(code8_of(scaled, midpoints));
    }
  }
}

}  // namespace

void blockwise8_quantize_cpu(const float* x, int64_t n, const float* code_map, int64_t blocksize,
                             int64_t block_begin, int64_t block_end, uint8_t* codes,
                             float* absmax, const float* offset) {
  if (offset == nullptr) {
    quantize_blocks([x](int64_t i) { return x[i]; }, n, code_map, blocksize, block_begin,
                    block_end, codes, absmax);
  } else {
    const float shift = *offset;
    quantize_blocks([x, shift](int64_t i) { return x[i] - shift; }, n, code_map, blocksize,
                    block_begin, block_end, codes, absmax);
  }
}

void blockwise8_dequantize_cpu(const uint8_t* codes, const float* absmax, const float* code_map,
                               int64_t n, int64_t blocksize, int64_t block_begin,
                               int64_t block_end, float* out) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const float scale = absmax[b];
    for (int64_t i = begin; i < end; ++i) out[i] = code_map[codes[i]] * scale;
  }
}

}  // namespace qlora
