"""Fused transformer-block operators: RMSNorm, RoPE and SwiGLU, forward and backward.

Python face of torch.ops.qlora_ext.{rms_norm, rms_norm_backward, rope, rope_, rope_append_kv_, decode_attention, swiglu,
swiglu_backward, swiglu_backward_, swiglu_scaled, swiglu_scaled_backward} (schemas: cpp/torch/schemas.cpp; math: cpp/include/qlora/
rms_norm.h, rope.h, swiglu.h): typed wrappers, fake kernels for torch.compile, and autograd.

All three compute in fp32 and round each output once. Each is one memory-bound pass where the
PyTorch composite makes several (and keeps fp32 intermediates alive for backward), so they pay
on a GPU; `qlora_ext.fused_blocks.enable_fused_block_ops` wires them into Llama-family models.

- rms_norm: transformers' LlamaRMSNorm semantics by default (cast_before_weight=True: the
  normalised row is rounded to x's dtype, then multiplied by the weight in the promoted dtype).
  Saves x and the fp32 inverse RMS per row for backward; the weight's gradient is computed only
  when the weight requires grad.
- rope: rotate-half RoPE of q and k in one call. The differentiable op is functional (new
  tensors); `rope_` rotates in place and is for calls that need no gradient (inference, the
  graph-less first pass of checkpointed layers). Why not an in-place op with autograd:
  `torch.library.register_autograd` accepts only functional schemas, and under torch.compile
  Inductor turns the functional op back into an in-place one where that is safe anyway.
- swiglu: silu(gate) * up. With backward_inplace=True the caller promises that gate and up are
  dead after this op (true inside a Llama MLP: the projections that made them do not keep their
  outputs), and the backward writes dgate over gate and dup over up: two [tokens, intermediate]
  buffers fewer at the peak of the MLP's backward.
- swiglu_scaled: the same of column-scaled operands, gate ⊙ gate_scale and up ⊙ up_scale, each
  rounded to the dtype first: DoRA's gate and up outputs are c ⊙ z, and the fused DoRA MLP
  (fused_mlp.py) passes z and c instead of writing c ⊙ z out and reading it back (forward,
  recomputation and backward: two [tokens, intermediate] passes each). swiglu_scaled_backward
  gives the gradients for the scaled operands, which DoRA's own backward takes (dora.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._native import native
from ._ops import past_autograd

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ops():
    native()  # loads the library that registers the operators
    return torch.ops.qlora_ext


# ---- wrappers ---------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, cast_before_weight: bool = True) -> Tensor:
    """RMSNorm of x [..., D] with weight [D] (x's dtype or fp32); differentiable in both.

    cast_before_weight=True is transformers' LlamaRMSNorm (also Mistral, Qwen2, Qwen3):
    `weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)`, output in promote(x.dtype, weight.dtype).
    False multiplies by the weight in fp32 and rounds once to x's dtype (qlora_ext's builtin
    TinyLlama, and the usual choice for fp32 norm weights in 16-bit models)."""
    return _differentiable("rms_norm", x, weight, float(eps), cast_before_weight)[0]


def _tables(q: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin as the kernels take them: [1 or B, T, Dh] of q's dtype or fp32."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin get no gradient from rope; pass them detached (HF computes them under no_grad)")
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    elif cos.dim() == 4 and cos.shape[1] == 1:  # [B, 1, T, Dh]: per-row positions broadcast over heads (packed rows)
        cos, sin = cos.squeeze(1), sin.squeeze(1)
    if cos.dtype not in (q.dtype, torch.float32):
        cos, sin = cos.float(), sin.float()
    return cos, sin


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(q*cos + rotate_half(q)*sin, the same for k) as new tensors with q's and k's strides;
    differentiable in q and k.

    q [B, Hq, T, Dh], k [B, Hk, T, Dh], any strides (a `view(B, T, H, Dh).transpose(1, 2)` of a
    projection output is read without a copy); cos, sin [B or 1, T, Dh] or [T, Dh], as
    transformers' rotary embeddings return them (the two halves equal)."""
    cos, sin = _tables(q, cos, sin)
    return _differentiable("rope", q, k, cos, sin, False)


def rope_gradient_only(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """rope's autograd node without its values: q and k returned unrotated (as views), their
    gradients rotated back as rope's are. For a recomputation in which nothing reads the rotated
    q and k, only their gradients (attention_replay: the attention output was kept): no launch
    and no [T, Hq+Hk, Dh] pass forward."""
    cos, sin = _tables(q, cos, sin)
    return _RopeGradientOnly.apply(q, k, cos, sin)


class _RopeGradientOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)  # what rope's formula reads (rope_setup_context)
        ctx.transpose, ctx.shapes = False, (q.shape, k.shape)
        ctx.set_materialize_grads(False)
        return q.view_as(q), k.view_as(k)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        return _TWINS["rope"].backward(ctx, grad_q, grad_k)[:4]


def rope_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """rope in place over q and k (unit stride along Dh); returns (q, k). Not differentiable: it
    raises if gradients are enabled and q or k requires grad (use `rope` then)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("rope_ rotates in place and has no autograd; use qlora_ext.block_ops.rope when q or k requires grad")
    cos, sin = _tables(q, cos, sin)
    _ops().rope_(q, k, cos, sin, False)
    return q, k


def rope_append_kv_(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_cache: Tensor,
                    value_cache: Tensor, length: Tensor) -> Tensor:  # fmt: skip
    """One decoding step's RoPE and KV-cache write: q rotated in place (returned), rope(k) and v
    written into key_cache / value_cache [B, Hk, L, D] at slots [P, P + T) with P = `length` (one
    int64 on the device, read there: a CUDA graph replays the step as is), then length = P + T.
    transformers' `StaticLayer.update(rope(k), v)` after `rope(q)`, with its `cumulative_length`
    as `length`; on CUDA one launch for a decode step where that is eight.

    q [B, Hq, T, Dh] with unit stride along Dh; k [B, Hk, T, Dh], v [B, Hk, T, Dv] (any strides);
    cos, sin as for `rope`. Not differentiable (raises when gradients are enabled and an input
    requires grad). A full cache (P + T > L) raises on the CPU and is a device-side error on CUDA,
    as index_copy_ out of bounds is."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, key_cache, value_cache)):
        raise RuntimeError("rope_append_kv_ writes in place and has no autograd; it is for inference")
    cos, sin = _tables(q, cos, sin)
    _ops().rope_append_kv_(q, k, v, cos, sin, key_cache, value_cache, length)
    return q


def decode_attention(q: Tensor, key_cache: Tensor, value_cache: Tensor, length: Tensor, mask: Tensor | None,
                     scale: float) -> Tensor:  # fmt: skip
    """Attention of one query token per row over the first `length` slots of a static KV cache,
    the G = Hq / Hk query heads of each K/V head reading it once: softmax(scale * q·kᵀ + mask)·v.

    q [B, Hq, 1, D] (unit stride along D); key_cache, value_cache [B, Hk, L, D]; length: one int64
    on the device (the filled slots, read there: a CUDA graph replays it); mask: None, or
    [B or 1, 1, 1, Lm >= L], bool (False excludes a slot) or additive (q's dtype or fp32). Slots
    at or past `length` are never attended. Returns [B, 1, Hq, D] in q's dtype (transformers'
    attention output layout); a row with every slot excluded gives zeros. On CUDA, fp16/bf16 with
    D in {64, 128, 256} run a split-over-slots kernel pair (cpp/kernels/cuda/
    decode_attention_cuda.cu), anything else ATen ops. Inference only: raises when gradients are
    enabled and an input requires grad."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, key_cache, value_cache)):
        raise RuntimeError("decode_attention has no autograd; it is for inference (decoding)")
    return _ops().decode_attention(q, key_cache, value_cache, length, mask, float(scale))


def decode_attention_kernel() -> bool:
    """Whether decode_attention on CUDA runs its kernels (else ATen ops, and the fused attention
    keeps SDPA on CUDA). Off by default: they pass their CUDA tests and sanitizers (H200) but
    decode slower than cuDNN's SDPA (H200: 277.6 against 282.6 tok/s, decode_8b_glu_h200.json);
    their CUDA tests switch them on."""
    return bool(native()._decode_attention_kernel())


def set_decode_attention_kernel(enabled: bool) -> None:
    """Switch decode_attention's CUDA kernels on or off, process-wide (see decode_attention_kernel)."""
    native()._set_decode_attention_kernel(bool(enabled))


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """rope_ (in place, no new memory) when no gradient is needed and q, k have unit stride along
    Dh, else rope. Only for q and k that the caller owns (fresh projection outputs)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if needs_grad or q.stride(-1) != 1 or k.stride(-1) != 1:
        return rope(q, k, cos, sin)
    return rope_(q, k, cos, sin)


def swiglu(gate: Tensor, up: Tensor, backward_inplace: bool = False) -> Tensor:
    """silu(gate) * up, fp32 math, output in the inputs' dtype; differentiable in both.

    backward_inplace=True: gate and up are dead after this call (nothing else reads them, not even
    another autograd node), so the backward may write its gradients over them."""
    return _differentiable("swiglu", gate, up, backward_inplace)


def swiglu_scaled(gate: Tensor, up: Tensor, gate_scale: Tensor, up_scale: Tensor) -> Tensor:
    """silu(g) * u with g = gate ⊙ gate_scale and u = up ⊙ up_scale (scales [I] over the last
    dimension, gate's dtype), each product rounded to the dtype first, as
    qlora_ext::dora_column_scale stores it: DoRA's gate and up projections (c ⊙ z) without
    writing them out. Differentiable in all four (d gate = dg ⊙ gate_scale, d gate_scale =
    Σ_rows dg ⊙ gate, in fp32, dg the gradient for g)."""
    return _differentiable("swiglu_scaled", gate, up, gate_scale, up_scale)


def _root(t: Tensor) -> Tensor:
    return t if t._base is None else t._base


def _can_write_over(dh: Tensor, gate: Tensor, up: Tensor) -> bool:
    """Whether swiglu_backward_ may write over gate and up: both contiguous, and gate, up and dh
    not views of one buffer (then they cannot share memory)."""
    roots = (_root(dh), _root(gate), _root(up))
    distinct = roots[0] is not roots[1] and roots[0] is not roots[2] and roots[1] is not roots[2]
    return distinct and gate.is_contiguous() and up.is_contiguous()


# ---- fakes and autograd -------------------------------------------------------------------------


def _check_float(t: Tensor, name: str) -> None:
    torch._check(t.dtype in FLOAT_DTYPES, lambda: f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _rms_norm_output_dtype(x: Tensor, weight: Tensor, cast_before_weight: bool) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if cast_before_weight else x.dtype


def _check_rms_norm_operands(x: Tensor, weight: Tensor) -> None:
    _check_float(x, "x")
    _check_float(weight, "weight")
    torch._check(x.dim() >= 1, lambda: "x must be [..., D] (at least one dimension)")
    torch._check(x.shape[-1] >= 1, lambda: f"x must have D >= 1, got shape {tuple(x.shape)}")
    torch._check(
        weight.dim() == 1 and weight.shape[0] == x.shape[-1],
        lambda: f"weight must be [D] = [{x.shape[-1]}], got shape {tuple(weight.shape)}",
    )
    torch._check(
        weight.dtype in (x.dtype, torch.float32),
        lambda: f"weight must have x's dtype {x.dtype} or be float32, got {weight.dtype}",
    )


def _unit_stride_copy(t: Tensor) -> Tensor:
    """What the native rope reads: t itself, or a contiguous copy when Dh's stride is not 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_rope_operands(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    _check_float(q, "q")
    torch._check(q.dim() == 4, lambda: f"q must be [B, Hq, T, Dh], got shape {tuple(q.shape)}")
    torch._check(k.dim() == 4, lambda: f"k must be [B, Hk, T, Dh], got shape {tuple(k.shape)}")
    torch._check(k.dtype == q.dtype, lambda: f"k must have q's dtype {q.dtype}, got {k.dtype}")
    B, _, T, Dh = q.shape
    torch._check(
        k.shape[0] == B and k.shape[2] == T and k.shape[3] == Dh,
        lambda: f"k must be [B, Hk, T, Dh] with q's B, T, Dh, got {tuple(k.shape)}",
    )
    torch._check(Dh >= 2 and Dh % 2 == 0, lambda: f"the head size Dh must be even and >= 2, got {Dh}")
    torch._check(
        cos.dim() == 3 and cos.shape[0] in (1, B) and cos.shape[1] == T and cos.shape[2] == Dh,
        lambda: f"cos must be [1 or B, T, Dh] = [1 or {B}, {T}, {Dh}], got shape {tuple(cos.shape)}",
    )
    torch._check(sin.shape == cos.shape, lambda: "sin must have cos's shape")
    torch._check(
        cos.dtype in (q.dtype, torch.float32) and sin.dtype == cos.dtype,
        lambda: f"cos and sin must have q's dtype {q.dtype} or be float32",
    )


def _check_swiglu_operands(gate: Tensor, up: Tensor, dh: Tensor | None = None) -> None:
    _check_float(gate, "gate")
    torch._check(up.shape == gate.shape, lambda: f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    torch._check(up.dtype == gate.dtype, lambda: f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    if dh is not None:
        torch._check(dh.shape == gate.shape, lambda: f"dh must have gate's shape {tuple(gate.shape)}")
        torch._check(dh.dtype == gate.dtype, lambda: f"dh must have gate's dtype {gate.dtype}")


def _check_swiglu_scales(gate: Tensor, gate_scale: Tensor, up_scale: Tensor) -> None:
    torch._check(gate.dim() >= 1 and gate.shape[-1] >= 1, lambda: "gate must be [..., I] with I >= 1")
    for name, scale in (("gate_scale", gate_scale), ("up_scale", up_scale)):
        torch._check(scale.dim() == 1 and scale.shape[0] == gate.shape[-1],
                     lambda: f"{name} must be [I] = [{gate.shape[-1]}], got shape {tuple(scale.shape)}")  # noqa: B023
        torch._check(scale.dtype == gate.dtype, lambda: f"{name} must have gate's dtype {gate.dtype}")  # noqa: B023


def _scale_grads(d_scaled: Tensor, operand: Tensor, scale: Tensor, need_operand: bool, need_scale: bool):
    """(d operand, d scale) from the gradient for operand ⊙ scale, in fp32 rounded once."""
    d32 = d_scaled.float()
    d_operand = (d32 * scale.float()).to(operand.dtype) if need_operand else None
    d_scale = None
    if need_scale:
        d_scale = (d32 * operand.float()).reshape(-1, operand.shape[-1]).sum(0).to(scale.dtype)
    return d_operand, d_scale


# ---- autograd ---------------------------------------------------------------------------------

#: Per differentiable op, an autograd.Function running the op's registered formula (filled by
#: register_fakes): what `_differentiable` calls outside torch.compile.
_TWINS: dict[str, type[torch.autograd.Function]] = {}


def _differentiable(name: str, *args):
    """torch.ops.qlora_ext.<name>(*args) with its autograd. Where an input requires grad (outside
    torch.compile) through `_TWINS[name]`: torch.library's autograd wrapper costs more Python per
    call than an autograd.Function with the same formula (rms_norm forward on [4, 64] on the
    2-core CPU: 47 against 18 µs), and a checkpointed 8B step makes ~10 such calls a layer in
    its host-bound backward (profile_step_gaps.py). Elsewhere past_autograd."""
    twin = _TWINS.get(name)
    if (twin is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(isinstance(a, Tensor) and a.requires_grad for a in args)):  # fmt: skip
        return twin.apply(*args)
    return past_autograd(getattr(_ops(), name), *args)


def _twin(name: str, setup_context, backward) -> type[torch.autograd.Function]:
    """An autograd.Function computing the op below its autograd kernel, with the formula that
    torch.library.register_autograd registers for it (the same setup_context and backward)."""

    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = getattr(_ops(), name)(*inputs)
        setup_context(ctx, inputs, output)
        # An output without a gradient (rms_norm's inv_rms, an unused rope output) reaches the
        # formula as None, which each handles, instead of as zeros autograd would launch a fill for.
        ctx.set_materialize_grads(False)
        return output

    return type(f"_{name}_autograd", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})  # fmt: skip


def _register_autograd(name: str, backward, setup_context) -> None:
    torch.library.register_autograd(f"qlora_ext::{name}", backward, setup_context=setup_context)
    _TWINS[name] = _twin(name, setup_context, backward)


_registered = False


def register_fakes() -> None:
    """Registers the fake kernels and autograd formulas once the library is loaded (called on
    package import)."""
    global _registered
    if _registered:
        return
    _registered = True

    # RMSNorm ---------------------------------------------------------------------------------

    @torch.library.register_fake("qlora_ext::rms_norm")
    def _(x, weight, eps, cast_before_weight=True):
        _check_rms_norm_operands(x, weight)
        rows = x.numel() // x.shape[-1]
        y = x.new_empty(x.shape, dtype=_rms_norm_output_dtype(x, weight, cast_before_weight))
        return y, x.new_empty((rows,), dtype=torch.float32)

    @torch.library.register_fake("qlora_ext::rms_norm_backward")
    def _(dy, x, weight, inv_rms, cast_before_weight=True, compute_dweight=True):
        _check_rms_norm_operands(x, weight)
        torch._check(dy.shape == x.shape, lambda: f"dy must have x's shape {tuple(x.shape)}")
        torch._check(
            dy.dtype == _rms_norm_output_dtype(x, weight, cast_before_weight),
            lambda: "dy must have the forward output's dtype",
        )
        torch._check(inv_rms.dtype == torch.float32, lambda: "inv_rms must be float32")
        dweight = weight.new_empty((x.shape[-1] if compute_dweight else 0,))
        return x.new_empty(x.shape), dweight

    def rms_norm_setup_context(ctx, inputs, output):
        x, weight, _eps, cast_before_weight = inputs
        _y, inv_rms = output
        ctx.save_for_backward(x, weight, inv_rms)
        ctx.cast_before_weight = cast_before_weight
        ctx.mark_non_differentiable(inv_rms)

    def rms_norm_backward(ctx, grad_y, _grad_inv_rms):
        if grad_y is None:  # (the twin does not materialize missing gradients)
            return None, None, None, None
        x, weight, inv_rms = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dweight = _ops().rms_norm_backward(grad_y, x, weight, inv_rms, ctx.cast_before_weight, need_weight)
        return (dx if need_x else None), (dweight if need_weight else None), None, None

    _register_autograd("rms_norm", rms_norm_backward, setup_context=rms_norm_setup_context)

    # RoPE ------------------------------------------------------------------------------------

    @torch.library.register_fake("qlora_ext::rope")
    def _(q, k, cos, sin, transpose=False):
        _check_rope_operands(q, k, cos, sin)
        return torch.empty_like(_unit_stride_copy(q)), torch.empty_like(_unit_stride_copy(k))

    @torch.library.register_fake("qlora_ext::rope_")
    def _(q, k, cos, sin, transpose=False):
        _check_rope_operands(q, k, cos, sin)
        torch._check(q.stride(-1) == 1 and k.stride(-1) == 1, lambda: "q and k need unit stride along Dh (in place)")

    @torch.library.register_fake("qlora_ext::rope_append_kv_")
    def _(q, k, v, cos, sin, key_cache, value_cache, length):
        _check_rope_operands(q, k, cos, sin)
        torch._check(q.stride(-1) == 1, lambda: "q needs unit stride along Dh (rotated in place)")
        B, Hk, T = k.shape[0], k.shape[1], k.shape[2]
        torch._check(v.dim() == 4 and tuple(v.shape[:3]) == (B, Hk, T), lambda: f"v must be [B, Hk, T, Dv], got {tuple(v.shape)}")
        for cache, name, dim in ((key_cache, "key_cache", q.shape[-1]), (value_cache, "value_cache", v.shape[-1])):
            torch._check(cache.dim() == 4 and cache.shape[0] == B and cache.shape[1] == Hk and cache.shape[3] == dim,
                         lambda: f"{name} must be [B, Hk, L, {dim}], got {tuple(cache.shape)}")  # fmt: skip
            torch._check(cache.dtype == q.dtype, lambda: f"{name} must have q's dtype {q.dtype}, got {cache.dtype}")
        torch._check(length.dtype == torch.int64 and length.numel() == 1, lambda: "length must hold one int64")

    @torch.library.register_fake("qlora_ext::decode_attention")
    def _(q, key_cache, value_cache, length, mask, scale):
        _check_float(q, "q")
        torch._check(q.dim() == 4 and q.shape[2] == 1, lambda: f"q must be [B, Hq, 1, D], got {tuple(q.shape)}")
        B, Hq, _, D = q.shape
        for cache, name in ((key_cache, "key_cache"), (value_cache, "value_cache")):
            torch._check(cache.dim() == 4 and cache.shape[0] == B and cache.shape[3] == D,
                         lambda: f"{name} must be [B, Hk, L, D], got {tuple(cache.shape)}")  # fmt: skip
            torch._check(cache.dtype == q.dtype, lambda: f"{name} must have q's dtype {q.dtype}, got {cache.dtype}")
        torch._check(Hq % key_cache.shape[1] == 0, lambda: "q's heads must be a multiple of the caches' heads")
        torch._check(length.dtype == torch.int64 and length.numel() == 1, lambda: "length must hold one int64")
        return q.new_empty((B, 1, Hq, D))

    def rope_setup_context(ctx, inputs, output):
        q, k, cos, sin, transpose = inputs
        ctx.save_for_backward(cos, sin)
        ctx.transpose = transpose
        ctx.shapes = (q.shape, k.shape)

    def rope_backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        if grad_q is None and grad_k is None:
            return None, None, None, None, None
        # The op needs both; a missing one (that output unused) has a zero gradient.
        if grad_q is None:
            grad_q = grad_k.new_zeros(ctx.shapes[0])
        if grad_k is None:
            grad_k = grad_q.new_zeros(ctx.shapes[1])
        dq, dk = past_autograd(_ops().rope, grad_q, grad_k, cos, sin, not ctx.transpose)
        return dq, dk, None, None, None

    _register_autograd("rope", rope_backward, setup_context=rope_setup_context)

    # SwiGLU ----------------------------------------------------------------------------------

    @torch.library.register_fake("qlora_ext::swiglu")
    def _(gate, up, backward_inplace=False):
        _check_swiglu_operands(gate, up)
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("qlora_ext::swiglu_backward")
    def _(dh, gate, up):
        _check_swiglu_operands(gate, up, dh)
        return gate.new_empty(gate.shape), up.new_empty(up.shape)

    @torch.library.register_fake("qlora_ext::swiglu_backward_")
    def _(dh, gate, up):
        _check_swiglu_operands(gate, up, dh)

    def swiglu_setup_context(ctx, inputs, output):
        gate, up, backward_inplace = inputs
        ctx.save_for_backward(gate, up)
        ctx.backward_inplace = backward_inplace

    def swiglu_backward(ctx, grad_h):
        gate, up = ctx.saved_tensors
        if ctx.backward_inplace and _can_write_over(grad_h, gate, up):
            _ops().swiglu_backward_(grad_h, gate, up)
            return gate, up, None
        dgate, dup = _ops().swiglu_backward(grad_h, gate, up)
        return dgate, dup, None

    _register_autograd("swiglu", swiglu_backward, setup_context=swiglu_setup_context)

    @torch.library.register_fake("qlora_ext::swiglu_scaled")
    def _(gate, up, gate_scale, up_scale):
        _check_swiglu_operands(gate, up)
        _check_swiglu_scales(gate, gate_scale, up_scale)
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("qlora_ext::swiglu_scaled_backward")
    def _(dh, gate, up, gate_scale, up_scale):
        _check_swiglu_operands(gate, up, dh)
        _check_swiglu_scales(gate, gate_scale, up_scale)
        return gate.new_empty(gate.shape), up.new_empty(up.shape)

    def swiglu_scaled_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def swiglu_scaled_backward(ctx, grad_h):
        gate, up, gate_scale, up_scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        dg, du = _ops().swiglu_scaled_backward(grad_h, gate, up, gate_scale, up_scale)
        d_gate, d_gate_scale = _scale_grads(dg, gate, gate_scale, need[0], need[2])
        d_up, d_up_scale = _scale_grads(du, up, up_scale, need[1], need[3])
        return d_gate, d_up, d_gate_scale, d_up_scale

    _register_autograd("swiglu_scaled", swiglu_scaled_backward, setup_context=swiglu_scaled_setup_context)


__all__ = ["rms_norm", "rope", "rope_", "rope_append_kv_", "decode_attention", "decode_attention_kernel",
           "set_decode_attention_kernel", "apply_rope", "swiglu", "swiglu_scaled", "register_fakes"]
