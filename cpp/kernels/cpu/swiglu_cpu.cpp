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

template <typename E>
void forward_range(const void* gate, const void* up, void* h, int64_t begin, int64_t end) {
  using S = typename E::Storage;
  const S* g = static_cast<const S*>(gate);
  const S* u = static_cast<const S*>(up);
  S* out = static_cast<S*>(h);
  for (int64_t i = begin; i < end; ++i) {
    const float gi = E::load(g, i);
    E::store(out, i, gi * sigmoid(gi) * E::load(u, i));
  }
}

template <typename E>
void backward_range(const void* dh, const void* gate, const void* up, void* dgate, void* dup,
                    int64_t begin, int64_t end) {
  using S = typename E::Storage;
  const S* d = static_cast<const S*>(dh);
  const S* g = static_cast<const S*>(gate);
  const S* u = static_cast<const S*>(up);
  S* dg = static_cast<S*>(dgate);
  S* du = static_cast<S*>(dup);
  for (int64_t i = begin; i < end; ++i) {
    const float di = E::load(d, i), gi = E::load(g, i), ui = E::load(u, i);
    const float s = sigmoid(gi);
    E::store(dg, i, di * ui * (s * (1.0f + gi * (1.0f - s))));
    E::store(du, i, di * (gi * s));
  }
}

}  // namespace

void swiglu_forward_cpu(const void* gate, const void* up, void* h, FloatType type, int64_t begin,
                        int64_t end) {
  dispatch_float(type, [&](auto e) { forward_range<decltype(e)>(gate, up, h, begin, end); });
}

void swiglu_backward_cpu(const void* dh, const void* gate, const void* up, void* dgate, void* dup,
                         FloatType type, int64_t begin, int64_t end) {
  dispatch_float(type, [&](auto e) {
    backward_range<decltype(e)>(dh, gate, up, dgate, dup, begin, end);
  });
}

}  // namespace qlora
