#include "block_op_args.h"

#include <ATen/MemoryOverlap.h>

#include <climits>
#include <iterator>
#include <utility>
#include <cmath>
#include <limits>

namespace qlora_torch {
namespace {

void check_dense(const at::Tensor& t, const char* arg) {
  QLORA_CHECK(t.layout() == at::kStrided, arg, " must be a dense tensor, got layout ", t.layout());
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& reference, const char* arg,
                      const char* reference_arg) {
  QLORA_CHECK(t.scalar_type() == reference.scalar_type(), arg, " must have ", reference_arg,
              "'s dtype ", reference.scalar_type(), ", got ", t.scalar_type());
}

void check_same_shape(const at::Tensor& t, const at::Tensor& reference, const char* arg,
                      const char* reference_arg) {
  QLORA_CHECK(t.sizes() == reference.sizes(), arg, " must have ", reference_arg, "'s shape ",
              reference.sizes(), ", got ", t.sizes());
}

// A tensor written in place: no element may appear twice (an expanded view).
void check_no_internal_overlap(const at::Tensor& t, const char* arg) {
  QLORA_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, arg,
              " has elements that share memory (an expanded view?); it is written in place");
}

// Two tensors of one in-place call must not share memory.
void check_disjoint(const at::Tensor& a, const at::Tensor& b, const char* a_arg,
                    const char* b_arg) {
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  QLORA_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
              a_arg, " and ", b_arg, " share memory; an in-place call needs them disjoint");
}

// A tensor that must not share memory with `b` at all (a KV cache, a counter): their byte spans
// may not intersect. Stricter than check_disjoint, which lets interleaved views through (q and k
// of one fused projection) and cannot judge most strided views.
void check_separate(const at::Tensor& a, const at::Tensor& b, const char* a_arg, const char* b_arg) {
  if (a.numel() == 0 || b.numel() == 0) return;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto* start = static_cast<const char*>(t.data_ptr());
    return std::make_pair(start, start + (last + 1) * t.element_size());
  };
  const auto [a_begin, a_end] = span(a);
  const auto [b_begin, b_end] = span(b);
  QLORA_CHECK(a_end <= b_begin || b_end <= a_begin, a_arg, " and ", b_arg,
              " share memory; an in-place call needs them disjoint");
}

// x [..., D] and weight [D]: the shared part of the forward and backward checks.
void check_rms_norm_operands(const at::Tensor& x, const at::Tensor& weight, int64_t& rows,
                             int64_t& D) {
  check_dense(x, "x");
  check_dense(weight, "weight");
  float_type_of(x.scalar_type(), "x");
  float_type_of(weight.scalar_type(), "weight");
  QLORA_CHECK(x.dim() >= 1, "x must be [..., D] (at least one dimension), got a 0-d tensor");
  D = x.size(-1);
  QLORA_CHECK(D >= 1, "x must have at least one element in its last dimension D, got shape ",
              x.sizes());
  rows = x.numel() / D;
  QLORA_CHECK(weight.dim() == 1 && weight.size(0) == D, "weight must be [D] = [", D,
              "] (x's last dimension), got shape ", weight.sizes());
  check_same_device(weight, x, "weight", "x");
  QLORA_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "weight must have x's dtype ", x.scalar_type(), " or be float32, got ",
              weight.scalar_type());
}

at::ScalarType rms_norm_output_dtype(const at::Tensor& x, const at::Tensor& weight,
                                     bool cast_before_weight) {
  // HF order: weight * normalised.to(x.dtype) is computed in the promoted dtype.
  return cast_before_weight ? at::promote_types(x.scalar_type(), weight.scalar_type())
                            : x.scalar_type();
}

void fill_operand(qlora::RopeOperand& op, const at::Tensor& t) {
  op.in = t.data_ptr();
  op.heads = t.size(1);
  op.in_stride_b = t.stride(0);
  op.in_stride_h = t.stride(1);
  op.in_stride_t = t.stride(2);
}

RopeChecked check_rope_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                const at::Tensor& sin, bool transpose, bool in_place) {
  check_dense(q, "q");
  check_dense(k, "k");
  check_dense(cos, "cos");
  check_dense(sin, "sin");
  float_type_of(q.scalar_type(), "q");
  QLORA_CHECK(q.dim() == 4, "q must be [B, Hq, T, Dh] (4 dimensions), got shape ", q.sizes());
  QLORA_CHECK(k.dim() == 4, "k must be [B, Hk, T, Dh] (4 dimensions), got shape ", k.sizes());
  check_same_dtype(k, q, "k", "q");
  check_same_device(k, q, "k", "q");
  const int64_t B = q.size(0), T = q.size(2), Dh = q.size(3);
  QLORA_CHECK(k.size(0) == B && k.size(2) == T && k.size(3) == Dh,
              "k must be [B, Hk, T, Dh] with q's B, T, Dh = ", B, ", ", T, ", ", Dh,
              ", got shape ", k.sizes());
  QLORA_CHECK(Dh >= 2 && Dh % 2 == 0, "the head size Dh (q's last dimension) must be even and >= 2, got ",
              Dh);
  QLORA_CHECK(T * (Dh / 2) <= INT_MAX, "T * Dh / 2 must be < 2^31, got T = ", T, ", Dh = ", Dh);
  QLORA_CHECK(cos.dim() == 3 && (cos.size(0) == 1 || cos.size(0) == B) && cos.size(1) == T &&
                  cos.size(2) == Dh,
              "cos must be [1 or B, T, Dh] = [1 or ", B, ", ", T, ", ", Dh, "], got shape ",
              cos.sizes());
  check_same_shape(sin, cos, "sin", "cos");
  check_same_device(cos, q, "cos", "q");
  check_same_device(sin, q, "sin", "q");
  check_same_dtype(sin, cos, "sin", "cos");
  QLORA_CHECK(cos.scalar_type() == q.scalar_type() || cos.scalar_type() == at::kFloat,
              "cos and sin must have q's dtype ", q.scalar_type(), " or be float32, got ",
              cos.scalar_type());
  RopeChecked c;
  if (in_place) {
    QLORA_CHECK(q.stride(3) == 1, "q must have unit stride along Dh to be rotated in place, got strides ",
                q.strides());
    QLORA_CHECK(k.stride(3) == 1, "k must have unit stride along Dh to be rotated in place, got strides ",
                k.strides());
    check_no_internal_overlap(q, "q");
    check_no_internal_overlap(k, "k");
    check_disjoint(q, k, "q", "k");
    c.q = q;
    c.k = k;
  } else {
    c.q = q.stride(3) == 1 ? q : q.contiguous();
    c.k = k.stride(3) == 1 ? k : k.contiguous();
  }
  c.cos = cos.contiguous();
  c.sin = sin.contiguous();
  qlora::RopeArgs& a = c.kernel;
  fill_operand(a.q, c.q);
  fill_operand(a.k, c.k);
  a.cos = c.cos.data_ptr();
  a.sin = c.sin.data_ptr();
  a.cos_batch = cos.size(0);
  a.batch = B;
  a.seq = T;
  a.head_dim = Dh;
  a.type = float_type_of(q.scalar_type(), "q");
  a.table_type = float_type_of(cos.scalar_type(), "cos");
  a.transpose = transpose;
  return c;
}

void check_swiglu_operands(const at::Tensor& gate, const at::Tensor& up) {
  check_dense(gate, "gate");
  check_dense(up, "up");
  float_type_of(gate.scalar_type(), "gate");
  check_same_shape(up, gate, "up", "gate");
  check_same_dtype(up, gate, "up", "gate");
  check_same_device(up, gate, "up", "gate");
}

// gate_scale / up_scale [I] of gate's dtype and device, I = gate's last dimension.
void check_swiglu_scale(const at::Tensor& scale, const at::Tensor& gate, const char* arg) {
  check_dense(scale, arg);
  QLORA_CHECK(gate.dim() >= 1 && gate.size(-1) >= 1, "gate must be [..., I] with I >= 1 for a scaled SwiGLU, got shape ",
              gate.sizes());
  QLORA_CHECK(scale.dim() == 1 && scale.size(0) == gate.size(-1), arg, " must be [I] = [", gate.size(-1),
              "] (gate's last dimension), got shape ", scale.sizes());
  check_same_dtype(scale, gate, arg, "gate");
  check_same_device(scale, gate, arg, "gate");
}

SwiGLUChecked with_scales(SwiGLUChecked c, const at::Tensor& gate_scale, const at::Tensor& up_scale) {
  check_swiglu_scale(gate_scale, c.gate, "gate_scale");
  check_swiglu_scale(up_scale, c.gate, "up_scale");
  c.gate_scale = gate_scale.contiguous();
  c.up_scale = up_scale.contiguous();
  return c;
}

}  // namespace

int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

RMSNormChecked check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                              bool cast_before_weight) {
  int64_t rows = 0, D = 0;
  check_rms_norm_operands(x, weight, rows, D);
  QLORA_CHECK(std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0, got ", eps);
  RMSNormChecked c;
  c.x = x.contiguous();
  c.weight = weight.contiguous();
  c.y_dtype = rms_norm_output_dtype(x, weight, cast_before_weight);
  qlora::RMSNormForwardArgs& a = c.kernel;
  a.x = c.x.data_ptr();
  a.weight = c.weight.data_ptr();
  a.rows = rows;
  a.D = D;
  a.eps = float(eps);
  a.cast_before_weight = cast_before_weight;
  a.x_type = float_type_of(x.scalar_type(), "x");
  a.weight_type = float_type_of(weight.scalar_type(), "weight");
  a.y_type = float_type_of(c.y_dtype, "y");
  return c;
}

RMSNormBackwardChecked check_rms_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                               const at::Tensor& weight,
                                               const at::Tensor& inv_rms,
                                               bool cast_before_weight) {
  int64_t rows = 0, D = 0;
  check_rms_norm_operands(x, weight, rows, D);
  check_dense(dy, "dy");
  check_dense(inv_rms, "inv_rms");
  check_same_shape(dy, x, "dy", "x");
  check_same_device(dy, x, "dy", "x");
  const at::ScalarType y_dtype = rms_norm_output_dtype(x, weight, cast_before_weight);
  QLORA_CHECK(dy.scalar_type() == y_dtype, "dy must have the forward output's dtype ", y_dtype,
              " (x ", x.scalar_type(), ", weight ", weight.scalar_type(),
              ", cast_before_weight = ", cast_before_weight, "), got ", dy.scalar_type());
  check_dtype(inv_rms, at::kFloat, "inv_rms");
  check_same_device(inv_rms, x, "inv_rms", "x");
  QLORA_CHECK(inv_rms.numel() == rows, "inv_rms must have one value per row of x (", rows,
              "), got shape ", inv_rms.sizes());
  RMSNormBackwardChecked c;
  c.dy = dy.contiguous();
  c.x = x.contiguous();
  c.weight = weight.contiguous();
  c.inv_rms = inv_rms.contiguous();
  qlora::RMSNormBackwardArgs& a = c.kernel;
  a.dy = c.dy.data_ptr();
  a.x = c.x.data_ptr();
  a.weight = c.weight.data_ptr();
  a.inv_rms = c.inv_rms.data_ptr<float>();
  a.rows = rows;
  a.D = D;
  a.cast_before_weight = cast_before_weight;
  a.x_type = float_type_of(x.scalar_type(), "x");
  a.weight_type = float_type_of(weight.scalar_type(), "weight");
  a.y_type = float_type_of(y_dtype, "dy");
  return c;
}

RopeChecked check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                       const at::Tensor& sin, bool transpose) {
  return check_rope_operands(q, k, cos, sin, transpose, /*in_place=*/false);
}

RopeChecked check_rope_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                               const at::Tensor& sin, bool transpose) {
  RopeChecked c = check_rope_operands(q, k, cos, sin, transpose, /*in_place=*/true);
  set_rope_outputs(c, c.q, c.k);
  return c;
}

RopeAppendChecked check_rope_append_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& cos, const at::Tensor& sin,
                                       const at::Tensor& key_cache, const at::Tensor& value_cache,
                                       const at::Tensor& length) {
  check_dense(q, "q");
  QLORA_CHECK(q.dim() == 4 && q.stride(3) == 1,
              "q must be [B, Hq, T, Dh] with unit stride along Dh (it is rotated in place), got shape ", q.sizes(),
              " and strides ", q.strides());
  check_no_internal_overlap(q, "q");
  RopeChecked rope = check_rope_operands(q, k, cos, sin, /*transpose=*/false, /*in_place=*/false);
  const int64_t B = q.size(0), Hk = k.size(1), T = q.size(2), Dh = q.size(3);
  check_dense(v, "v");
  QLORA_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == Hk && v.size(2) == T && v.size(3) >= 1,
              "v must be [B, Hk, T, Dv] with k's B, Hk, T = ", B, ", ", Hk, ", ", T, ", got shape ", v.sizes());
  check_same_dtype(v, q, "v", "q");
  check_same_device(v, q, "v", "q");
  const int64_t Dv = v.size(3);
  auto check_cache = [&](const at::Tensor& cache, const char* arg, int64_t dim) {
    check_dense(cache, arg);
    QLORA_CHECK(cache.dim() == 4 && cache.size(0) == B && cache.size(1) == Hk && cache.size(3) == dim,
                arg, " must be [B, Hk, L, ", dim, "] = [", B, ", ", Hk, ", L, ", dim, "], got shape ", cache.sizes());
    QLORA_CHECK(cache.stride(3) == 1, arg, " must have unit stride along its last dimension, got strides ",
                cache.strides());
    check_same_dtype(cache, q, arg, "q");
    check_same_device(cache, q, arg, "q");
    check_no_internal_overlap(cache, arg);
  };
  check_cache(key_cache, "key_cache", Dh);
  check_cache(value_cache, "value_cache", Dv);
  QLORA_CHECK(value_cache.size(2) == key_cache.size(2), "value_cache must have key_cache's L = ", key_cache.size(2),
              " slots, got shape ", value_cache.sizes());
  check_dense(length, "length");
  check_dtype(length, at::kLong, "length");
  QLORA_CHECK(length.numel() == 1, "length must hold one int64 (the filled slots), got shape ", length.sizes());
  check_same_device(length, q, "length", "q");
  // Written: q (in place: elementwise disjoint from k and v, which may be other heads of its
  // projection), key_cache, value_cache and length (no memory in common with anything else).
  check_disjoint(q, k, "q", "k");
  check_disjoint(q, v, "q", "v");
  const std::pair<const at::Tensor*, const char*> separate[] = {
      {&key_cache, "key_cache"}, {&value_cache, "value_cache"}, {&length, "length"}};
  const std::pair<const at::Tensor*, const char*> others[] = {{&q, "q"}, {&k, "k"}, {&v, "v"}};
  for (size_t w = 0; w < std::size(separate); ++w) {
    for (const auto& other : others) check_separate(*separate[w].first, *other.first, separate[w].second, other.second);
    for (size_t o = w + 1; o < std::size(separate); ++o) {
      check_separate(*separate[w].first, *separate[o].first, separate[w].second, separate[o].second);
    }
  }
  RopeAppendChecked c;
  c.q = q;
  c.k = rope.k;
  c.v = v.stride(3) == 1 ? v : v.contiguous();
  c.cos = rope.cos;
  c.sin = rope.sin;
  qlora::RopeAppendArgs& a = c.kernel;
  a.rope = rope.kernel;
  a.rope.q.out = q.data_ptr();
  a.rope.q.out_stride_b = q.stride(0);
  a.rope.q.out_stride_h = q.stride(1);
  a.rope.q.out_stride_t = q.stride(2);
  a.rope.k.out = key_cache.data_ptr();
  a.rope.k.out_stride_b = key_cache.stride(0);
  a.rope.k.out_stride_h = key_cache.stride(1);
  a.rope.k.out_stride_t = key_cache.stride(2);
  a.v = c.v.data_ptr();
  a.v_stride_b = c.v.stride(0);
  a.v_stride_h = c.v.stride(1);
  a.v_stride_t = c.v.stride(2);
  a.value_cache = value_cache.data_ptr();
  a.value_cache_stride_b = value_cache.stride(0);
  a.value_cache_stride_h = value_cache.stride(1);
  a.value_cache_stride_t = value_cache.stride(2);
  a.v_dim = Dv;
  a.capacity = key_cache.size(2);
  a.length = length.data_ptr<int64_t>();
  return c;
}

DecodeAttentionChecked check_decode_attention(const at::Tensor& q, const at::Tensor& key_cache,
                                              const at::Tensor& value_cache, const at::Tensor& length,
                                              const std::optional<at::Tensor>& mask, double scale) {
  check_dense(q, "q");
  const qlora::FloatType type = float_type_of(q.scalar_type(), "q");
  QLORA_CHECK(q.dim() == 4 && q.size(2) == 1 && q.stride(3) == 1,
              "q must be [B, Hq, 1, D] (one query token) with unit stride along D, got shape ", q.sizes(),
              " and strides ", q.strides());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3);
  for (const auto& [cache, arg] : {std::pair<const at::Tensor&, const char*>{key_cache, "key_cache"},
                                   std::pair<const at::Tensor&, const char*>{value_cache, "value_cache"}}) {
    check_dense(cache, arg);
    QLORA_CHECK(cache.dim() == 4 && cache.size(0) == B && cache.size(3) == D && cache.stride(3) == 1, arg,
                " must be [B, Hk, L, D] = [", B, ", Hk, L, ", D, "] with unit stride along D, got shape ",
                cache.sizes(), " and strides ", cache.strides());
    check_same_dtype(cache, q, arg, "q");
    check_same_device(cache, q, arg, "q");
  }
  check_same_shape(value_cache, key_cache, "value_cache", "key_cache");
  const int64_t Hk = key_cache.size(1), L = key_cache.size(2);
  QLORA_CHECK(Hk >= 1 && Hq % Hk == 0, "q's heads Hq = ", Hq, " must be a multiple of the caches' Hk = ", Hk);
  check_dense(length, "length");
  check_dtype(length, at::kLong, "length");
  QLORA_CHECK(length.numel() == 1, "length must hold one int64 (the filled slots), got shape ", length.sizes());
  check_same_device(length, q, "length", "q");
  QLORA_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  DecodeAttentionChecked c;
  c.q = q;
  c.key_cache = key_cache;
  c.value_cache = value_cache;
  c.length = length;
  c.scale = scale;
  qlora::DecodeAttentionArgs& a = c.kernel;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    check_dense(m, "mask");
    QLORA_CHECK(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == B) && m.size(1) == 1 && m.size(2) == 1 &&
                    m.size(3) >= L,
                "mask must be [B or 1, 1, 1, Lm] with Lm >= L = ", L, " (one row over the cache's slots), got shape ",
                m.sizes());
    QLORA_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type() || m.scalar_type() == at::kFloat,
                "mask must be bool, q's dtype ", q.scalar_type(), " or float32, got ", m.scalar_type());
    check_same_device(m, q, "mask", "q");
    c.mask = m;
    a.mask = m.data_ptr();
    a.mask_kind = m.scalar_type() == at::kBool ? qlora::MaskKind::Boolean : qlora::MaskKind::Additive;
    a.mask_type = m.scalar_type() == at::kBool ? qlora::FloatType::F32 : float_type_of(m.scalar_type(), "mask");
    a.mask_stride_b = m.size(0) == 1 ? 0 : m.stride(0);
    a.mask_stride_s = m.stride(3);
  }
  a.q = q.data_ptr();
  a.q_stride_b = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.key_cache = key_cache.data_ptr();
  a.value_cache = value_cache.data_ptr();
  a.k_stride_b = key_cache.stride(0);
  a.k_stride_h = key_cache.stride(1);
  a.k_stride_s = key_cache.stride(2);
  a.v_stride_b = value_cache.stride(0);
  a.v_stride_h = value_cache.stride(1);
  a.v_stride_s = value_cache.stride(2);
  a.length = length.data_ptr<int64_t>();
  a.batch = B;
  a.q_heads = Hq;
  a.kv_heads = Hk;
  a.capacity = L;
  a.head_dim = D;
  a.scale = float(scale);
  a.type = type;
  return c;
}

at::Tensor decode_attention_aten(const DecodeAttentionChecked& c) {
  const int64_t B = c.q.size(0), Hq = c.q.size(1), D = c.q.size(3);
  const int64_t Hk = c.key_cache.size(1), L = c.key_cache.size(2), G = Hq / Hk;
  if (B == 0 || Hq == 0 || L == 0 || D == 0) return at::zeros({B, 1, Hq, D}, c.q.options());  // nothing to attend
  const at::Tensor q = c.q.reshape({B, Hk, G, D}).to(at::kFloat);
  const at::Tensor k = c.key_cache.to(at::kFloat);
  const at::Tensor slots = at::arange(L, c.length.options());
  const at::Tensor filled = slots < c.length.reshape({});
  // Slots past the length are never read (they may hold anything, NaN included): zero V there, and
  // exclude their scores below.
  const at::Tensor v = c.value_cache.to(at::kFloat).masked_fill(filled.logical_not().reshape({1, 1, L, 1}), 0.0);
  at::Tensor scores = at::matmul(q * c.scale, k.transpose(2, 3));  // [B, Hk, G, L]
  at::Tensor allowed = filled.reshape({1, 1, 1, L});
  const double inf = std::numeric_limits<double>::infinity();
  if (c.mask.defined()) {
    const at::Tensor m = c.mask.narrow(3, 0, L).reshape({c.mask.size(0), 1, 1, L});
    if (m.scalar_type() == at::kBool) {
      allowed = allowed & m;
    } else {
      scores = scores + m.to(at::kFloat);
    }
  }
  scores = scores.masked_fill(allowed.logical_not(), -inf);
  at::Tensor top = std::get<0>(scores.max(-1, /*keepdim=*/true));
  top = top.masked_fill(top == -inf, 0.0);  // a row with every slot excluded: all p = 0
  const at::Tensor p = (scores - top).exp();
  const at::Tensor l = p.sum(-1, /*keepdim=*/true);
  at::Tensor out = at::matmul(p, v) / l;  // [B, Hk, G, D]
  out = out.masked_fill(l == 0, 0.0);
  return out.reshape({B, 1, Hq, D}).to(c.q.scalar_type());
}

void set_rope_outputs(RopeChecked& c, const at::Tensor& q_out, const at::Tensor& k_out) {
  auto set = [](qlora::RopeOperand& op, const at::Tensor& out) {
    op.out = out.data_ptr();
    op.out_stride_b = out.stride(0);
    op.out_stride_h = out.stride(1);
    op.out_stride_t = out.stride(2);
  };
  set(c.kernel.q, q_out);
  set(c.kernel.k, k_out);
}

SwiGLUChecked check_swiglu(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_operands(gate, up);
  return {gate.contiguous(), up.contiguous(), at::Tensor(), gate.numel(),
          float_type_of(gate.scalar_type(), "gate")};
}

SwiGLUChecked check_swiglu_backward(const at::Tensor& dh, const at::Tensor& gate,
                                    const at::Tensor& up) {
  check_swiglu_operands(gate, up);
  check_dense(dh, "dh");
  check_same_shape(dh, gate, "dh", "gate");
  check_same_dtype(dh, gate, "dh", "gate");
  check_same_device(dh, gate, "dh", "gate");
  return {gate.contiguous(), up.contiguous(), dh.contiguous(), gate.numel(),
          float_type_of(gate.scalar_type(), "gate")};
}

SwiGLUChecked check_swiglu_backward_inplace(const at::Tensor& dh, const at::Tensor& gate,
                                            const at::Tensor& up) {
  SwiGLUChecked c = check_swiglu_backward(dh, gate, up);
  QLORA_CHECK(gate.is_contiguous(), "gate must be contiguous: swiglu_backward_ writes dgate into it");
  QLORA_CHECK(up.is_contiguous(), "up must be contiguous: swiglu_backward_ writes dup into it");
  check_disjoint(gate, up, "gate", "up");
  check_disjoint(dh, gate, "dh", "gate");
  check_disjoint(dh, up, "dh", "up");
  return c;
}

SwiGLUChecked check_swiglu_scaled(const at::Tensor& gate, const at::Tensor& up,
                                  const at::Tensor& gate_scale, const at::Tensor& up_scale) {
  return with_scales(check_swiglu(gate, up), gate_scale, up_scale);
}

SwiGLUChecked check_swiglu_scaled_backward(const at::Tensor& dh, const at::Tensor& gate,
                                           const at::Tensor& up, const at::Tensor& gate_scale,
                                           const at::Tensor& up_scale) {
  return with_scales(check_swiglu_backward(dh, gate, up), gate_scale, up_scale);
}

}  // namespace qlora_torch
