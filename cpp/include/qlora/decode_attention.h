// Attention of one new token per sequence over a static KV cache (decoding), with grouped K/V
// heads read once per group:
//
//   out[b, h, :] = sum_s p[s] * value_cache[b, h / G, s, :],
//   p = softmax over s in [0, P) of  scale * q[b, h, :] . key_cache[b, h / G, s, :] + mask[b, s]
//
// G = Hq / Hk query heads per K/V head; P = *length, the filled slots (read on the device, so a
// CUDA graph replays a decode step as is; transformers' StaticLayer.cumulative_length after
// rope_append_kv_). The mask, optional, is additive (q's dtype or fp32: -inf excludes a slot) or
// boolean (false excludes), one row per batch row [B or 1, Lm >= P] with any strides. Slots at or
// past P are never read: a causal decode step's mask excludes them anyway. A row whose every slot
// is excluded gives zeros (it has no defined softmax). Math in fp32, the output rounded once.
//
// Layouts: q [B, Hq, D] (any strides, unit stride along D); caches [B, Hk, L, D], unit stride
// along D; out [B, Hq, D] contiguous. D in {64, 128, 256}; fp16 or bf16 (the CUDA kernels).
//
// Torch-free: plain pointers and sizes; the CUDA entry point is in kernels_cuda.h.
#pragma once

#include <cstdint>

#include "qlora/float_types.h"

namespace qlora {

enum class MaskKind { None, Additive, Boolean };

struct DecodeAttentionArgs {
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0;
  const void* key_cache = nullptr;
  const void* value_cache = nullptr;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;
  const int64_t* length = nullptr;
  const void* mask = nullptr;
  MaskKind mask_kind = MaskKind::None;
  FloatType mask_type = FloatType::F32;  // additive masks: q's type or F32
  int64_t mask_stride_b = 0, mask_stride_s = 0;  // stride_b 0: one row for every batch row
  void* out = nullptr;  // [B, Hq, D] contiguous
  int64_t batch = 0, q_heads = 0, kv_heads = 0, capacity = 0, head_dim = 0;
  float scale = 1.0f;
  FloatType type = FloatType::BF16;
};

}  // namespace qlora
