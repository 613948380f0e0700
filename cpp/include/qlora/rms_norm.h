// RMSNorm over the last dimension, forward and backward (transformers' LlamaRMSNorm semantics).
//
// For a row x [D] (rows are contiguous, row r at x + r*D) and weight w [D]:
//
//   r      = 1 / sqrt(sum_c x_c^2 / D + eps)            fp32, stored per row (inv_rms)
//   n_c    = x_c * r                                    fp32
//   y_c    = Y(w_c * X(n_c))        cast_before_weight  (HF: the normalised row is rounded to x's
//                                                        dtype X first; Y = promote(X, W))
//   y_c    = Y(w_c * n_c)           otherwise           (the product in fp32, rounded once; Y = X)
//
// Backward, with g_c = dy_c * w_c in fp32 (the rounding of n is an identity for gradients):
//
//   dx_c   = r * (g_c - n_c * (sum_j g_j * n_j) / D)    rounded to X
//   dw_c   = sum over rows of dy_c * m_c,  m_c = X(n_c) (cast_before_weight) or n_c
//
// dw is returned as per-range fp32 partial sums that the caller adds up (in a fixed order, so the
// result does not depend on the thread count) and rounds to the weight's dtype.
//
// Torch-free: plain pointers and sizes. CPU functions work on a range of rows so that the caller
// can split the work over threads; CUDA entry points are in kernels_cuda.h.
#pragma once

#include <cstdint>

#include "qlora/float_types.h"

namespace qlora {

struct RMSNormForwardArgs {
  const void* x = nullptr;       // [rows, D] of x_type
  const void* weight = nullptr;  // [D] of weight_type
  void* y = nullptr;             // [rows, D] of y_type
  float* inv_rms = nullptr;      // [rows]
  int64_t rows = 0, D = 0;
  float eps = 0.0f;
  bool cast_before_weight = true;
  FloatType x_type = FloatType::F32, weight_type = FloatType::F32, y_type = FloatType::F32;
};

struct RMSNormBackwardArgs {
  const void* dy = nullptr;       // [rows, D] of y_type
  const void* x = nullptr;        // [rows, D] of x_type
  const void* weight = nullptr;   // [D] of weight_type
  const float* inv_rms = nullptr; // [rows], from the forward
  void* dx = nullptr;             // [rows, D] of x_type
  int64_t rows = 0, D = 0;
  bool cast_before_weight = true;
  FloatType x_type = FloatType::F32, weight_type = FloatType::F32, y_type = FloatType::F32;
};

// The (x, weight, y) type combinations the kernels are built for: weight is x's type or fp32, and
// y is x's type or fp32 (y = fp32 needs weight = fp32 and cast_before_weight, the promoted dtype).
inline bool rms_norm_types_supported(FloatType x, FloatType weight, FloatType y) {
  const bool weight_ok = weight == x || weight == FloatType::F32;
  const bool y_ok = y == x || (y == FloatType::F32 && weight == FloatType::F32);
  return weight_ok && y_ok;
}

// Rows [row_begin, row_end) of the forward.
void rms_norm_forward_cpu(const RMSNormForwardArgs& a, int64_t row_begin, int64_t row_end);

// Rows [row_begin, row_end) of the backward: writes their dx; when dweight_partial [D] is not
// null, overwrites it with those rows' fp32 sum of dy * m (see above).
void rms_norm_backward_cpu(const RMSNormBackwardArgs& a, int64_t row_begin, int64_t row_end,
                           float* dweight_partial);

// dweight [D] of weight_type = the sum over p < parts of partial[p, c] (fp32, in order of p).
void rms_norm_sum_partials_cpu(const float* partial, int64_t parts, int64_t D, void* dweight,
                               FloatType weight_type);

}  // namespace qlora
