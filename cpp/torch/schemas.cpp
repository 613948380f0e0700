// Every operator of the qlora_ext namespace, one line each on what it computes and its shapes.
// Implementations: ops_cpu.cpp, ops_cuda.cpp; fake kernels and autograd: python/qlora_ext/_ops.py.
// DoRA: dora_ops_cpu.cpp, dora_ops_cuda.cpp; fakes: python/qlora_ext/dora.py.
// AdamW steps: adamw_ops_cpu.cpp, adamw_ops_cuda.cpp; their fakes: python/qlora_ext/optim/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(qlora_ext, m) {
  // weight [any shape, n elements] fp32/fp16/bf16 -> (packed uint8 [(n+1)//2, 1], absmax fp32 [ceil(n/blocksize)])
  m.def("nf4_quantize(Tensor weight, int blocksize) -> (Tensor packed, Tensor absmax)");
  // nf4_quantize, then the absmax centred on its mean (offset, fp32 0-d) and 8-bit quantized with
  // nested_code (fp32 [256], sorted) in blocks of nested_blocksize:
  // -> (packed, absmax codes uint8 [n_blocks], nested_absmax fp32 [ceil(n_blocks/nested_blocksize)], offset)
  m.def(
      "nf4_double_quantize(Tensor weight, int blocksize, Tensor nested_code, int nested_blocksize=256) "
      "-> (Tensor packed, Tensor absmax, Tensor nested_absmax, Tensor offset)");
  // packed uint8 [(n+1)//2 elements] + scales -> dtype tensor of `shape` (n = prod(shape)).
  // Plain: absmax fp32 [n_blocks]. Double-quantized: absmax uint8 codes [n_blocks], nested_absmax
  // fp32 [ceil(n_blocks/nested_blocksize)], nested_code fp32 [256], nested_offset fp32 [1].
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, ScalarType dtype, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? nested_offset=None, "
      "int nested_blocksize=256) -> Tensor");
  // The same into a given contiguous tensor (its shape and dtype are the shape and dtype above):
  // several weights dequantized into row ranges of one buffer, with no concatenation copy.
  m.def(
      "nf4_dequantize_into(Tensor(a!) out, Tensor packed, Tensor absmax, int blocksize, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? nested_offset=None, "
      "int nested_blocksize=256) -> ()");
  // y [..., N] = x [..., K] · deq(W [N, K])ᵀ (+ bias [N]) in x's dtype (fp32/fp16/bf16), fp32 sums;
  // prod(x.shape[:-1]) <= 16 (decode); W as for nf4_dequantize, dequantized to x's dtype.
  m.def(
      "nf4_gemv(Tensor x, Tensor packed, Tensor absmax, int blocksize, SymInt[] weight_shape, "
      "Tensor? bias=None, Tensor? nested_absmax=None, Tensor? nested_code=None, "
      "Tensor? nested_offset=None, int nested_blocksize=256) -> Tensor");
  // Several weights that multiply one x (q, k, v; gate, up), in one call: part p is W_p [rows[p], K]
  // with its own packed, absmax (and nested_absmax, nested_offset), one nested_code for all; y
  // [..., sum(rows)] = the parts' nf4_gemv products side by side (+ bias [sum(rows)]); without double quantization the nested lists are empty, nested_code None. CUDA runs
  // up to 4 parts as one launch where the factored kernels apply (kernels_cuda.h), else part by part.
  m.def(
      "nf4_gemv_grouped(Tensor x, Tensor[] packed, Tensor[] absmax, int blocksize, int[] rows, "
      "Tensor[] nested_absmax, Tensor? nested_code, Tensor[] nested_offset, Tensor? bias, "
      "int nested_blocksize) -> Tensor");
  // The MLP's gate and up with SwiGLU after them, one call: nf4_gemv_grouped's arguments with two
  // parts of equal rows N (gate, up; bias [2N], gate's then up's) -> swiglu(gate, up) [..., N], the
  // bits of nf4_gemv_grouped followed by swiglu. CUDA runs one launch (SwiGLU in the GEMV's
  // epilogue) where nf4_gemv_swiglu_cuda_supported holds (kernels_cuda.h), else those two ops.
  m.def(
      "nf4_gemv_swiglu(Tensor x, Tensor[] packed, Tensor[] absmax, int blocksize, int[] rows, "
      "Tensor[] nested_absmax, Tensor? nested_code, Tensor[] nested_offset, Tensor? bias, "
      "int nested_blocksize) -> Tensor");
  // The same product for prefill-sized x: prod(x.shape[:-1]) <= 256, a tiled tensor-core GEMM that
  // dequantizes W inside (CUDA, fp16/bf16, K % 64 == 0); other cases dequantize + matrix product.
  m.def(
      "nf4_gemm(Tensor x, Tensor packed, Tensor absmax, int blocksize, SymInt[] weight_shape, "
      "Tensor? bias=None, Tensor? nested_absmax=None, Tensor? nested_code=None, "
      "Tensor? nested_offset=None, int nested_blocksize=256) -> Tensor");
  // DoRA's column scale (math: qlora/dora.h), its detached norm taken without forming W + s·B·A:
  // wa = deq(W)·Aᵀ [N, r] fp32/fp16/bf16, lora_A [r, K], lora_B [N, r], weight_sq = ‖deq(W)_i‖²
  // fp32 [N], magnitude [N] -> (col_scale = m/‖W + s·B·A‖_row [N] in wa's dtype, inv_norm fp32 [N])
  m.def(
      "dora_scale(Tensor wa, Tensor lora_A, Tensor lora_B, Tensor weight_sq, Tensor magnitude, "
      "float scale) -> (Tensor col_scale, Tensor inv_norm)");
  // The same for S <= 4 layers with one rank r, their output rows stacked (the attention's q, k,
  // v: one call where three would run): layer j has rows[j] rows and scale scales[j]; wa =
  // W_stacked·A_stackedᵀ [N, S·r] (row block j reads its column block j), lora_A [S·r, K] (the
  // A's stacked), lora_B [N, r] (the B's stacked), weight_sq, magnitude [N] -> the S layers'
  // (col_scale, inv_norm) concatenated, as dora_scale gives them one by one.
  m.def(
      "dora_scale_stacked(Tensor wa, Tensor lora_A, Tensor lora_B, Tensor weight_sq, "
      "Tensor magnitude, int[] rows, float[] scales) -> (Tensor col_scale, Tensor inv_norm)");
  // Its backward in one pass: dy, z [..., N] and col_scale [N] of one dtype, inv_norm fp32 [N]
  // -> (dz = dy ⊙ col_scale [..., N], dmagnitude = inv_norm ⊙ Σ_rows dy ⊙ z fp32 [N])
  m.def(
      "dora_scale_backward(Tensor dy, Tensor z, Tensor col_scale, Tensor inv_norm) "
      "-> (Tensor dz, Tensor dmagnitude)");
  // The forward's output: z [..., N], col_scale [N], bias [N] or None, one dtype -> y = z ⊙
  // col_scale (+ bias) [..., N] (fp32 product, then the bias added, one rounding). Differentiable
  // (autograd: python/qlora_ext/dora.py).
  m.def("dora_column_scale(Tensor z, Tensor col_scale, Tensor? bias=None) -> Tensor");
  // DoRA's gate and up backward through the MLP's SwiGLU in one pass: dh, gate, up [..., I] (gate
  // and up: the projections' z), gate_scale, up_scale [I] of that dtype, gate_inv_norm,
  // up_inv_norm fp32 [I] -> (dz_gate, dz_up [..., I], dm_gate, dm_up fp32 [I]); the bits of
  // swiglu_scaled_backward followed by dora_scale_backward of each of its two gradients.
  m.def(
      "swiglu_scaled_dora_backward(Tensor dh, Tensor gate, Tensor up, Tensor gate_scale, "
      "Tensor up_scale, Tensor gate_inv_norm, Tensor up_inv_norm) "
      "-> (Tensor dz_gate, Tensor dz_up, Tensor dm_gate, Tensor dm_up)");
  // x fp32 [any shape, n] + sorted code map fp32 [256] -> (codes uint8 [x.shape], absmax fp32 [ceil(n/blocksize)])
  m.def("blockwise8_quantize(Tensor x, Tensor code, int blocksize, Tensor? offset=None) -> (Tensor codes, Tensor absmax)");
  // codes uint8 [any shape, n] + absmax fp32 [ceil(n/blocksize)] + code fp32 [256] -> fp32 [codes.shape]
  m.def("blockwise8_dequantize(Tensor codes, Tensor absmax, Tensor code, int blocksize) -> Tensor");
  // AdamW in place on tensor lists (math: qlora/adamw.h): params[i], grads[i] [n_i] fp32/fp16/bf16
  // (same dtype), exp_avgs[i], exp_avg_sqs[i] fp32 [n_i]; step >= 1; grad_scale multiplies grads.
  m.def(
      "adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, float grad_scale=1.0) -> ()");
  // AdamW with 8-bit blockwise state, in place: codes uint8 [n_i], absmax fp32 [ceil(n_i/256)],
  // m against exp_avg_map (signed dynamic map fp32 [256]), v against exp_avg_sq_map (unsigned).
  m.def(
      "adamw_step_8bit(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_codes, "
      "Tensor(c!)[] exp_avg_absmax, Tensor(d!)[] exp_avg_sq_codes, Tensor(e!)[] exp_avg_sq_absmax, "
      "Tensor exp_avg_map, Tensor exp_avg_sq_map, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, float grad_scale=1.0) -> ()");

  // Transformer-block operators (math: qlora/rms_norm.h, rope.h, swiglu.h; CPU and CUDA kernels in
  // block_ops_cpu.cpp / block_ops_cuda.cpp; wrappers, fakes and autograd: qlora_ext/block_ops.py).
  // RMSNorm: x [..., D], weight [D] (x's dtype or fp32) -> (y [..., D], inv_rms fp32 [rows]);
  // y = weight * x.dtype(x * inv_rms) in promote(x, weight) (HF order), or with
  // cast_before_weight=False x.dtype(weight * x * inv_rms) (the product in fp32).
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool cast_before_weight=True) -> (Tensor y, Tensor inv_rms)");
  // dy [..., D] (y's dtype) -> (dx [..., D] x's dtype, dweight [D] weight's dtype, fp32 sum over
  // rows; [0] when not compute_dweight).
  m.def(
      "rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor inv_rms, "
      "bool cast_before_weight=True, bool compute_dweight=True) -> (Tensor dx, Tensor dweight)");
  // RoPE, rotate-half: q [B, Hq, T, Dh], k [B, Hk, T, Dh] (any strides), cos, sin [1 or B, T, Dh]
  // (q's dtype or fp32) -> (q*cos + rotate_half(q)*sin, the same for k), q's strides;
  // transpose=True applies the transposed rotation (the backward).
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool transpose=False) -> (Tensor q_out, Tensor k_out)");
  // rope in place over q and k (unit stride along Dh); for calls that need no gradient.
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, bool transpose=False) -> ()");
  // One decode step's RoPE and KV-cache write (qlora/rope.h): q rotated in place, rope(k) and v
  // written into key_cache / value_cache [B, Hk, L, D] at slots [P, P + T), P = length (one int64,
  // read on the device), then length = P + T. transformers' StaticLayer.update after the rope.
  m.def(
      "rope_append_kv_(Tensor(a!) q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(b!) key_cache, "
      "Tensor(c!) value_cache, Tensor(d!) length) -> ()");
  // One query token's attention over a static KV cache with grouped K/V heads (qlora/
  // decode_attention.h): q [B, Hq, 1, D], key_cache / value_cache [B, Hk, L, D], the first
  // `length` slots (one int64, read on the device), an optional mask [B or 1, 1, 1, Lm >= L]
  // (bool or additive) -> [B, 1, Hq, D] in q's dtype. Inference only (no autograd).
  m.def(
      "decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor length, Tensor? mask, "
      "float scale) -> Tensor");
  // SwiGLU: gate, up [any shape] -> silu(gate) * up, same shape and dtype. backward_inplace: the
  // caller says gate and up are dead after this op, so its backward may write the gradients over
  // them (swiglu_backward_).
  m.def("swiglu(Tensor gate, Tensor up, bool backward_inplace=False) -> Tensor");
  // dh, gate, up [same shape] -> (dgate, dup) of that shape.
  m.def("swiglu_backward(Tensor dh, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)");
  // swiglu_backward writing dgate over gate and dup over up (contiguous, disjoint).
  m.def("swiglu_backward_(Tensor dh, Tensor(a!) gate, Tensor(b!) up) -> ()");
  // SwiGLU of column-scaled operands (DoRA's gate and up are c ⊙ z): gate, up [..., I],
  // gate_scale, up_scale [I] (gate's dtype) -> silu(g) * u with g = T(gate * gate_scale), u =
  // T(up * up_scale), each product rounded to the dtype first (as dora_column_scale stores it).
  m.def("swiglu_scaled(Tensor gate, Tensor up, Tensor gate_scale, Tensor up_scale) -> Tensor");
  // -> (dg, du): the gradients for the scaled operands g and u (not for gate and up).
  m.def(
      "swiglu_scaled_backward(Tensor dh, Tensor gate, Tensor up, Tensor gate_scale, Tensor up_scale) "
      "-> (Tensor dgate_scaled, Tensor dup_scaled)");
}

// None of these operators is differentiable (codes are piecewise constant; the quantized base
// weight is frozen, DESIGN.md §1). Autograd falls through, so outputs never require grad instead
// of carrying a "not implemented" grad_fn that PyTorch warns may be silently wrong.
TORCH_LIBRARY_IMPL(qlora_ext, Autograd, m) {
  m.impl("nf4_quantize", torch::CppFunction::makeFallthrough());
  m.impl("nf4_dequantize", torch::CppFunction::makeFallthrough());
  m.impl("blockwise8_quantize", torch::CppFunction::makeFallthrough());
  m.impl("blockwise8_dequantize", torch::CppFunction::makeFallthrough());
  // DoRA's scale and its backward are the pieces of nf4_dora_linear's forward and backward
  // (python/qlora_ext/dora.py), which carries the autograd.
  m.impl("dora_scale", torch::CppFunction::makeFallthrough());
  m.impl("dora_scale_stacked", torch::CppFunction::makeFallthrough());
  m.impl("dora_scale_backward", torch::CppFunction::makeFallthrough());
  m.impl("swiglu_scaled_dora_backward", torch::CppFunction::makeFallthrough());
}
