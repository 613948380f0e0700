// Element-type traits for the CPU kernels of the transformer-block operators (RMSNorm, RoPE,
// SwiGLU): load as fp32, store from fp32 with round-to-nearest-even, and round an fp32 value to
// the type (`round`), so a kernel is written once over fp32 and instantiated per storage type.
#pragma once

#include <cstdint>

#include "qlora/float_types.h"

namespace qlora {
namespace cpu_detail {

struct F32 {
  using Storage = float;
  static float load(const float* p, int64_t i) { return p[i]; }
  static void store(float* p, int64_t i, float v) { p[i] = v; }
  static float round(float v) { return v; }
};
struct F16 {
  using Storage = uint16_t;
  static float load(const uint16_t* p, int64_t i) { return f16_to_float(p[i]); }
  static void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_f16(v); }
  static float round(float v) { return f16_to_float(float_to_f16(v)); }
};
struct BF16 {
  using Storage = uint16_t;
  static float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
  static void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
  static float round(float v) { return bf16_to_float(float_to_bf16(v)); }
};

// Calls f(E{}) with E the traits of `type`.
template <typename F>
void dispatch_float(FloatType type, F&& f) {
  switch (type) {
    case FloatType::F32: f(F32{}); return;
    case FloatType::F16: f(F16{}); return;
    case FloatType::BF16: f(BF16{}); return;
  }
}

}  // namespace cpu_detail
}  // namespace qlora
