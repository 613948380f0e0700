// SwiGLU forward and backward on the CPU (math: qlora/swiglu.h). Elementwise over a range the
// caller picks per thread; in-place backward (dgate == gate, dup == up) is safe because each
// element is read before it is written, by the same iteration.
#include <cmath>

#include "cpu_elements.h"
#include "qlora/swiglu.h"

namespace qlora {
namespace {

using namespace cpu_detail;

inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

// Element i of an operand as the SwiGLU sees it: as stored, or times its column's scale and
// rounded to the element type (qlora/swiglu.h).
template <typename E>
struct Operand {
  const typename E::Storage* values;
  const typename E::Storage* scale;  // nullptr: unscaled
  int64_t columns;

  float operator()(int64_t i) const {
    const float v = E::load(values, i);
    return scale == nullptr ? v : E::round(v * E::load(scale, i % columns));
  }
};

template <typename E>
Operand<E> operand(const void* values, const void* scale, int64_t columns) {
  using S = typename E::Storage;
  return {static_cast<const S*>(values), static_cast<const S*>(scale), columns};
}

template <typename E>
void forward_range(const void* gate, const void* up, void* h, int64_t begin, int64_t end,
                   SwiGLUScales scales) {
  const Operand<E> g = operand<E>(gate, scales.gate, scales.columns);
  const Operand<E> u = operand<E>(up, scales.up, scales.columns);
  auto* out = static_cast<typename E::Storage*>(h);
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g(i);
    E::store(out, i, gi * sigmoid(gi) * u(i));
  }
}

template <typename E>
void backward_range(const void* dh, const void* gate, const void* up, void* dgate, void* dup,
                    int64_t begin, int64_t end, SwiGLUScales scales) {
  using S = typename E::Storage;
  const S* d = static_cast<const S*>(dh);
  const Operand<E> g = operand<E>(gate, scales.gate, scales.columns);
  const Operand<E> u = operand<E>(up, scales.up, scales.columns);
  S* dg = static_cast<S*>(dgate);
  S* du = static_cast<S*>(dup);
  for (int64_t i = begin; i < end; ++i) {
    const float di = E::load(d, i), gi = g(i), ui = u(i);
    const float s = sigmoid(gi);
    E::store(dg, i, di * ui * (s * (1.0f + gi * (1.0f - s))));
    E::store(du, i, di * (gi * s));
  }
}

}  // namespace

void swiglu_forward_cpu(const void* gate, const void* up, void* h, FloatType type, int64_t begin,
                        int64_t end, SwiGLUScales scales) {
  dispatch_float(type, [&](auto e) { forward_range<decltype(e)>(gate, up, h, begin, end, scales); });
}

void swiglu_backward_cpu(const void* dh, const void* gate, const void* up, void* dgate, void* dup,
                         FloatType type, int64_t begin, int64_t end, SwiGLUScales scales) {
  dispatch_float(type, [&](auto e) {
    backward_range<decltype(e)>(dh, gate, up, dgate, dup, begin, end, scales);
  });
}

}  // namespace qlora
