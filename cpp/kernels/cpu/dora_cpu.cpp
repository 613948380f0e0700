// DoRA's column scale and its backward on the CPU (math: qlora/dora.h).
//
// The caller splits the work over threads (at::parallel_for in the torch glue): the forward by
// rows of W, the backward by columns of dy, so each thread owns its outputs and its column sums
// (no reductions across threads, the result does not depend on the thread count).
#include <cmath>
#include <vector>

#include "qlora/dora.h"

namespace qlora {
namespace {

// Loads and stores of the three activation types, resolved once per call instead of per element.
struct F32Io {
  using Storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
struct F16Io {
  using Storage = uint16_t;
  static float load(uint16_t v) { return f16_to_float(v); }
  static uint16_t store(float v) { return float_to_f16(v); }
};
struct BF16Io {
  using Storage = uint16_t;
  static float load(uint16_t v) { return bf16_to_float(v); }
  static uint16_t store(float v) { return float_to_bf16(v); }
};

template <typename F>
void dispatch_io(FloatType type, F&& f) {
  switch (type) {
    case FloatType::F32: f(F32Io{}); return;
    case FloatType::F16: f(F16Io{}); return;
    case FloatType::BF16: f(BF16Io{}); return;
  }
}

template <typename Io>
void scale_rows(const typename Io::Storage* wa, const float* b, const float* gram,
                const float* weight_sq, const float* magnitude, int64_t r, const DoRAStack& stack,
                int64_t row_begin, int64_t row_end, typename Io::Storage* col_scale,
                float* inv_norm) {
  const int64_t width = stack.count * r;  // wa's and gram's row length
  int layer = 0;
  for (int64_t i = row_begin; i < row_end; ++i) {
    while (i >= stack.row_end[layer]) ++layer;
    const float scale = stack.scale[layer], two_s = 2.0f * scale, s_sq = scale * scale;
    const float* g = gram + layer * r * (width + 1);  // diagonal block (layer, layer)
    const typename Io::Storage* wa_row = wa + i * width + layer * r;
    const float* b_row = b + i * r;
    float cross = 0.0f, quad = 0.0f;  // ⟨B_i, wa_i⟩ and B_i·G·B_iᵀ
    for (int64_t j = 0; j < r; ++j) {
      float g_b = 0.0f;
      for (int64_t l = 0; l < r; ++l) g_b += g[j * width + l] * b_row[l];
      cross += b_row[j] * Io::load(wa_row[j]);
      quad += b_row[j] * g_b;
    }
    const float norm_sq = weight_sq[i] + (two_s * cross + s_sq * quad);
    const float inv = 1.0f / std::sqrt(std::fmax(norm_sq, 0.0f));
    inv_norm[i] = inv;
    col_scale[i] = Io::store(magnitude[i] * inv);
  }
}

template <typename Io>
void scale_backward_columns(const typename Io::Storage* dy, const typename Io::Storage* z,
                            const typename Io::Storage* col_scale, const float* inv_norm,
                            int64_t M, int64_t N, int64_t col_begin, int64_t col_end,
                            typename Io::Storage* dz, float* dmagnitude) {
  const int64_t width = col_end - col_begin;
  std::vector<double> sums(width, 0.0);
  std::vector<float> scales(width);
  for (int64_t c = 0; c < width; ++c) scales[c] = Io::load(col_scale[col_begin + c]);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t row = m * N + col_begin;
    for (int64_t c = 0; c < width; ++c) {
      const float g = Io::load(dy[row + c]);
      sums[c] += double(g) * double(Io::load(z[row + c]));
      dz[row + c] = Io::store(g * scales[c]);
    }
  }
  for (int64_t c = 0; c < width; ++c) {
    dmagnitude[col_begin + c] = float(sums[c] * double(inv_norm[col_begin + c]));
  }
}

template <typename Io>
void column_scale_rows(const typename Io::Storage* z, const typename Io::Storage* col_scale,
                       const typename Io::Storage* bias, int64_t N, int64_t row_begin,
                       int64_t row_end, typename Io::Storage* y) {
  std::vector<float> scales(N), shifts(N, 0.0f);
  for (int64_t c = 0; c < N; ++c) scales[c] = Io::load(col_scale[c]);
  if (bias != nullptr) {
    for (int64_t c = 0; c < N; ++c) shifts[c] = Io::load(bias[c]);
  }
  for (int64_t m = row_begin; m < row_end; ++m) {
    const typename Io::Storage* z_row = z + m * N;
    typename Io::Storage* y_row = y + m * N;
    for (int64_t c = 0; c < N; ++c) {
      // The product is rounded to fp32 before the add (-ffp-contract=off, CMakeLists.txt), the
      // rounding the CUDA kernel makes with __fmul_rn / __fadd_rn.
      const float product = Io::load(z_row[c]) * scales[c];
      y_row[c] = Io::store(bias != nullptr ? product + shifts[c] : product);
    }
  }
}

}  // namespace

void dora_column_scale_cpu(const void* z, const void* col_scale, const void* bias, FloatType type,
                           int64_t N, int64_t row_begin, int64_t row_end, void* y) {
  dispatch_io(type, [&](auto io) {
    using Io = decltype(io);
    using S = typename Io::Storage;
    column_scale_rows<Io>(static_cast<const S*>(z), static_cast<const S*>(col_scale),
                          static_cast<const S*>(bias), N, row_begin, row_end, static_cast<S*>(y));
  });
}

void dora_scale_cpu(const void* wa, FloatType type, const float* lora_b, const float* gram,
                    const float* weight_sq, const float* magnitude, int64_t r,
                    const DoRAStack& stack, int64_t row_begin, int64_t row_end, void* col_scale,
                    float* inv_norm) {
  dispatch_io(type, [&](auto io) {
    using Io = decltype(io);
    using S = typename Io::Storage;
    scale_rows<Io>(static_cast<const S*>(wa), lora_b, gram, weight_sq, magnitude, r, stack,
                   row_begin, row_end, static_cast<S*>(col_scale), inv_norm);
  });
}

void dora_scale_backward_cpu(const void* dy, const void* z, const void* col_scale,
                             const float* inv_norm, FloatType type, int64_t M, int64_t N,
                             int64_t col_begin, int64_t col_end, void* dz, float* dmagnitude) {
  dispatch_io(type, [&](auto io) {
    using Io = decltype(io);
    using S = typename Io::Storage;
    scale_backward_columns<Io>(static_cast<const S*>(dy), static_cast<const S*>(z),
                               static_cast<const S*>(col_scale), inv_norm, M, N, col_begin,
                               col_end, static_cast<S*>(dz), dmagnitude);
  });
}

}  // namespace qlora
