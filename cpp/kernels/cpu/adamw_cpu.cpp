// Fused AdamW update on the CPU, 32-bit and 8-bit blockwise state (math: qlora/adamw.h).
//
// The caller splits the work into element ranges (32-bit) or ranges of whole 256-element blocks
// (8-bit) over threads. The element type is a template parameter, so each loop body is one load,
// the update and one store per array, and the compiler can vectorise the fp32 case.
#include <algorithm>
#include <cmath>

#include "qlora/adamw.h"
#include "qlora/nf4.h"

namespace qlora {
namespace {

struct F32 {
  using Storage = float;
  static float load(const float* p, int64_t i) { return p[i]; }
  static void store(float* p, int64_t i, float v) { p[i] = v; }
};
struct F16 {
  using Storage = uint16_t;
  static float load(const uint16_t* p, int64_t i) { return f16_to_float(p[i]); }
  static void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_f16(v); }
};
struct BF16 {
  using Storage = uint16_t;
  static float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
  static void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
};

template <typename F>
void dispatch(FloatType type, F&& f) {
  switch (type) {
    case FloatType::F32: f(F32{}); return;
    case FloatType::F16: f(F16{}); return;
    case FloatType::BF16: f(BF16{}); return;
  }
}

template <typename E>
void adamw32_range(const AdamW32Tensor& t, int64_t begin, int64_t end, const AdamWHyper& h) {
  using S = typename E::Storage;
  S* param = static_cast<S*>(t.param);
  const S* grad = static_cast<const S*>(t.grad);
  for (int64_t i = begin; i < end; ++i) {
    float p = E::load(param, i);
    adamw_update(p, E::load(grad, i), t.exp_avg[i], t.exp_avg_sq[i], h);
    E::store(param, i, p);
  }
}

struct Midpoints8 {
  float values[kCodeMapSize - 1];
  explicit Midpoints8(const float* map) {
    for (int i = 0; i < kCodeMapSize - 1; ++i) values[i] = (map[i] + map[i + 1]) / 2.0f;
  }
};

// NaN-propagating max |x|: a NaN state shows in absmax instead of being dropped.
float absmax_of(const float* x, int64_t count) {
  float amax = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    const float a = std::fabs(x[i]);
    if (a > amax || std::isnan(a)) amax = a;
  }
  return amax;
}

template <typename E>
void adamw8_range(const AdamW8Tensor& t, int64_t block_begin, int64_t block_end,
                  const float* map1, const float* map2, const AdamWHyper& h) {
  using S = typename E::Storage;
  S* param = static_cast<S*>(t.param);
  const S* grad = static_cast<const S*>(t.grad);
  const Midpoints8 mid1(map1), mid2(map2);
  float m[kAdamW8BlockSize], v[kAdamW8BlockSize];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * kAdamW8BlockSize;
    const int64_t count = std::min(t.n - begin, kAdamW8BlockSize);
    const float scale1 = t.exp_avg_absmax[b], scale2 = t.exp_avg_sq_absmax[b];
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = begin + j;
      m[j] = map1[t.exp_avg_codes[i]] * scale1;
      v[j] = map2[t.exp_avg_sq_codes[i]] * scale2;
      float p = E::load(param, i);
      adamw_update(p, E::load(grad, i), m[j], v[j], h);
      E::store(param, i, p);
    }
    const float amax1 = absmax_of(m, count), amax2 = absmax_of(v, count);
    t.exp_avg_absmax[b] = amax1;
    t.exp_avg_sq_absmax[b] = amax2;
    const float inv1 = 1.0f / std::max(amax1, kMinAbsmax), inv2 = 1.0f / std::max(amax2, kMinAbsmax);
    for (int64_t j = 0; j < count; ++j) {
      const float s1 = std::min(1.0f, std::max(-1.0f, m[j] * inv1));
      const float s2 = std::min(1.0f, std::max(-1.0f, v[j] * inv2));
      t.exp_avg_codes[begin + j] = static_cast<uint8_t>(code8_of(s1, mid1.values));
      t.exp_avg_sq_codes[begin + j] = static_cast<uint8_t>(code8_of(s2, mid2.values));
    }
  }
}

}  // namespace

AdamWHyper make_adamw_hyper(double lr, double beta1, double beta2, double eps,
                            double weight_decay, int64_t step, double grad_scale) {
  AdamWHyper h;
  h.beta1 = float(beta1);
  h.one_minus_beta1 = float(1.0 - beta1);
  h.beta2 = float(beta2);
  h.one_minus_beta2 = float(1.0 - beta2);
  h.eps = float(eps);
  h.decay = float(1.0 - lr * weight_decay);
  h.step_size = float(lr / (1.0 - std::pow(beta1, double(step))));
  h.inv_bc2_sqrt = float(1.0 / std::sqrt(1.0 - std::pow(beta2, double(step))));
  h.grad_scale = float(grad_scale);
  return h;
}

void adamw32_step_cpu(const AdamW32Tensor& t, FloatType type, int64_t begin, int64_t end,
                      const AdamWHyper& h) {
  dispatch(type, [&](auto e) { adamw32_range<decltype(e)>(t, begin, end, h); });
}

void adamw8_step_cpu(const AdamW8Tensor& t, FloatType type, int64_t block_begin, int64_t block_end,
                     const float* exp_avg_map, const float* exp_avg_sq_map, const AdamWHyper& h) {
  dispatch(type, [&](auto e) {
    adamw8_range<decltype(e)>(t, block_begin, block_end, exp_avg_map, exp_avg_sq_map, h);
  });
}

}  // namespace qlora
