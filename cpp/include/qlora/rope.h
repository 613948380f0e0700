// Rotary position embedding (RoPE) of queries and keys, transformers' rotate-half convention.
//
// For a row x [Dh] of q or k at batch b, head h, position t, with c = cos[b', t], s = sin[b', t]
// (b' = b, or 0 when the tables have one batch row) and half = Dh / 2:
//
//   out = x * c + rotate_half(x) * s,   rotate_half(x) = [-x[half:], x[:half]]
//   out[i]        = x[i] * c[i]               - x[i + half] * s[i]
//   out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half]          (i < half)
//
// transpose applies the transposed linear map, which is the backward (dx = Mᵀ dy):
//
//   dx[i]         = dy[i] * c[i]               + dy[i + half] * s[i + half]
//   dx[i + half]  = dy[i + half] * c[i + half] - dy[i] * s[i]
//
// With the two halves of each table row equal (what LlamaRotaryEmbedding returns), that is the
// same rotation with -sin. Math in fp32 (each product and the sum rounded separately, no FMA, so
// an fp32 result equals PyTorch's `q * cos + rotate_half(q) * sin` in fp32 bit for bit), rounded
// to the element type once.
//
// Layout: q is [B, Hq, T, Dh], k [B, Hk, T, Dh], each with arbitrary strides for B, H and T (in
// elements) and unit stride along Dh: a [B, T, H, Dh] projection output viewed as [B, H, T, Dh]
// by a transpose is rotated in place without a copy. Output may alias input exactly (in place).
// cos and sin are contiguous [cos_batch, T, Dh] of table_type (q's type or fp32).
//
// Torch-free: plain pointers and sizes; the CUDA entry point is in kernels_cuda.h.
#pragma once

#include <cstdint>

#include "qlora/float_types.h"

namespace qlora {

struct RopeOperand {
  const void* in = nullptr;
  void* out = nullptr;  // may equal `in` (then the strides must be equal too)
  int64_t heads = 0;
  int64_t in_stride_b = 0, in_stride_h = 0, in_stride_t = 0;
  int64_t out_stride_b = 0, out_stride_h = 0, out_stride_t = 0;
};

struct RopeArgs {
  RopeOperand q, k;
  const void* cos = nullptr;  // [cos_batch, T, Dh] of table_type
  const void* sin = nullptr;
  int64_t cos_batch = 1;      // 1 or batch
  int64_t batch = 0, seq = 0, head_dim = 0;
  FloatType type = FloatType::F32;        // q, k and outputs
  FloatType table_type = FloatType::F32;  // cos, sin: `type` or F32
  bool transpose = false;

  // Rows of Dh elements: q's B*Hq*T rows (b, h, t in row-major order) followed by k's B*Hk*T.
  int64_t rows() const { return batch * (q.heads + k.heads) * seq; }
};

// Rows [row_begin, row_end) of RopeArgs::rows().
void rope_cpu(const RopeArgs& a, int64_t row_begin, int64_t row_end);

// rope_append_kv_: one decode step's RoPE and KV-cache write, in one launch on CUDA (where the
// unfused path takes eight: the rope, and the cache's slot arange, counter adds, contiguous
// copies of k and v and two index_copy_). With P = *length (read on the device, so that a CUDA
// graph replays it at every step):
//   q                                  <- rope(q)                 (in place)
//   key_cache[b, h, P + t, :]          <- rope(k)[b, h, t, :]
//   value_cache[b, h, P + t, :]        <- v[b, h, t, :]
//   *length                            <- P + T
// which is transformers' StaticLayer.update after the rope (its cumulative_length is `length`).
// key_cache [B, Hk, L, Dh] and value_cache [B, Hk, L, Dv] have unit stride along their last
// dimension; P + T > L is a device-side error (the cache is full), as index_copy_'s bound check is.
struct RopeAppendArgs {
  RopeArgs rope;  // q: out = in (in place); k: in = k, out = key_cache at slot 0 (key_cache's strides)
  const void* v = nullptr;  // [B, Hk, T, Dv], unit stride along Dv
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_t = 0;
  void* value_cache = nullptr;  // at slot 0
  int64_t value_cache_stride_b = 0, value_cache_stride_h = 0, value_cache_stride_t = 0;
  int64_t v_dim = 0;
  int64_t capacity = 0;       // L, the cache's slots
  int64_t* length = nullptr;  // the filled slots P, advanced by T
};

}  // namespace qlora
