// RMSNorm forward and backward on the CPU (math: qlora/rms_norm.h).
//
// The caller splits rows over threads. Per row: one pass for the sum of squares (forward) or the
// dot product sum g*n (backward), a second pass for the outputs; the row (<= a few KB) is still in
// L1 for the second pass. Row sums use 16 independent fp32 lanes added in a fixed order, so the
// compiler can vectorise them without reassociating (-ffp-contract=off, no fast-math) and the
// result is the same on every run and thread count.
#include <cmath>

#include "cpu_elements.h"
#include "qlora/rms_norm.h"

namespace qlora {
namespace {

using namespace cpu_detail;

constexpr int kLanes = 16;

// sum_c term(c) over c < D in kLanes interleaved partial sums, combined pairwise.
template <typename Term>
float lane_sum(int64_t D, Term term) {
  float lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= D; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += term(c + l);
  }
  float tail = 0.0f;
  for (; c < D; ++c) tail += term(c);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0] + tail;
}

template <typename X>
float inverse_rms(const typename X::Storage* x, int64_t D, float eps) {
  const float sum = lane_sum(D, [x](int64_t c) {
    const float v = X::load(x, c);
    return v * v;
  });
  return 1.0f / std::sqrt(sum / float(D) + eps);
}

template <typename X, typename W, typename Y>
void forward_rows(const RMSNormForwardArgs& a, int64_t begin, int64_t end) {
  const auto* x = static_cast<const typename X::Storage*>(a.x);
  const auto* w = static_cast<const typename W::Storage*>(a.weight);
  auto* y = static_cast<typename Y::Storage*>(a.y);
  const int64_t D = a.D;
  for (int64_t r = begin; r < end; ++r) {
    const auto* xr = x + r * D;
    auto* yr = y + r * D;
    const float inv = inverse_rms<X>(xr, D, a.eps);
    a.inv_rms[r] = inv;
    if (a.cast_before_weight) {
      for (int64_t c = 0; c < D; ++c) Y::store(yr, c, W::load(w, c) * X::round(X::load(xr, c) * inv));
    } else {
      for (int64_t c = 0; c < D; ++c) Y::store(yr, c, W::load(w, c) * (X::load(xr, c) * inv));
    }
  }
}

template <typename X, typename W, typename Y>
void backward_rows(const RMSNormBackwardArgs& a, int64_t begin, int64_t end, float* dw) {
  const auto* dy = static_cast<const typename Y::Storage*>(a.dy);
  const auto* x = static_cast<const typename X::Storage*>(a.x);
  const auto* w = static_cast<const typename W::Storage*>(a.weight);
  auto* dx = static_cast<typename X::Storage*>(a.dx);
  const int64_t D = a.D;
  if (dw != nullptr) {
    for (int64_t c = 0; c < D; ++c) dw[c] = 0.0f;
  }
  for (int64_t r = begin; r < end; ++r) {
    const auto* dyr = dy + r * D;
    const auto* xr = x + r * D;
    auto* dxr = dx + r * D;
    const float inv = a.inv_rms[r];
    const float dot = lane_sum(D, [&](int64_t c) {
      return (Y::load(dyr, c) * W::load(w, c)) * (X::load(xr, c) * inv);
    });
    const float mean_dot = dot / float(D);
    for (int64_t c = 0; c < D; ++c) {
      const float g = Y::load(dyr, c) * W::load(w, c);
      const float n = X::load(xr, c) * inv;
      X::store(dxr, c, inv * (g - n * mean_dot));
    }
    if (dw == nullptr) continue;
    if (a.cast_before_weight) {
      for (int64_t c = 0; c < D; ++c) dw[c] += Y::load(dyr, c) * X::round(X::load(xr, c) * inv);
    } else {
      for (int64_t c = 0; c < D; ++c) dw[c] += Y::load(dyr, c) * (X::load(xr, c) * inv);
    }
  }
}

// Calls f(X{}, W{}, Y{}) for one of the combinations of rms_norm_types_supported (the caller has
// checked it): W and Y are each X or F32.
template <typename F>
void dispatch_types(FloatType x_type, FloatType weight_type, FloatType y_type, F&& f) {
  dispatch_float(x_type, [&](auto x) {
    using X = decltype(x);
    auto with_weight = [&](auto w) {
      if (y_type == x_type) {
        f(x, w, X{});
      } else {
        f(x, w, F32{});
      }
    };
    if (weight_type == x_type) {
      with_weight(X{});
    } else {
      with_weight(F32{});
    }
  });
}

}  // namespace

void rms_norm_forward_cpu(const RMSNormForwardArgs& a, int64_t row_begin, int64_t row_end) {
  dispatch_types(a.x_type, a.weight_type, a.y_type, [&](auto x, auto w, auto y) {
    forward_rows<decltype(x), decltype(w), decltype(y)>(a, row_begin, row_end);
  });
}

void rms_norm_backward_cpu(const RMSNormBackwardArgs& a, int64_t row_begin, int64_t row_end,
                           float* dweight_partial) {
  dispatch_types(a.x_type, a.weight_type, a.y_type, [&](auto x, auto w, auto y) {
    backward_rows<decltype(x), decltype(w), decltype(y)>(a, row_begin, row_end, dweight_partial);
  });
}

void rms_norm_sum_partials_cpu(const float* partial, int64_t parts, int64_t D, void* dweight,
                               FloatType weight_type) {
  dispatch_float(weight_type, [&](auto w) {
    using W = decltype(w);
    auto* out = static_cast<typename W::Storage*>(dweight);
    for (int64_t c = 0; c < D; ++c) {
      float total = 0.0f;
      for (int64_t p = 0; p < parts; ++p) total += partial[p * D + c];
      W::store(out, c, total);
    }
  });
}

}  // namespace qlora
