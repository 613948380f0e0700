"""Linear layers on an NF4 base weight, as PyTorch operators with autograd.

    qlora_ext::nf4_linear       y = x·deq(W)ᵀ (+ bias)
    qlora_ext::nf4_lora_linear  y = x·deq(W)ᵀ (+ bias) + s·(x_lora·Aᵀ)·Bᵀ,  also returns xa = x_lora·Aᵀ

Shapes: x, x_lora [..., K]; W [N, K] (stored NF4); A [r, K]; B [N, r]; bias [N]; y [..., N];
xa [..., r]. M below is the number of rows of x flattened to [M, K].

Design (DESIGN.md §4):
- The compute dtype is x.dtype. W is dequantized to its stored dtype (bit-exact with
  bitsandbytes) and then cast, so fp64 works for gradcheck although NF4 stores at most fp32.
  A, B and bias are cast to x.dtype for the products; their gradients come back in their own dtype
  (adapters are usually kept in fp32 while activations are bf16, as with autocast).
- No dequantized W lives between forward and backward: backward dequantizes again. Saved for
  backward: x_lora [M, K] (an input that autograd keeps anyway), xa [M, r], and references to
  A, B and the quantized tensors.
- Thin products are bracketed so that nothing N×K beyond deq(W), and nothing K×K, forms:
  g = s·(dY·B) [M, r];  dX = dY·deq(W) (+ g·A);  dA = gᵀ·x_lora;  dB = s·dYᵀ·xa.
- `x_lora=None` means "the LoRA path sees x itself" (no dropout): then the LoRA input gradient
  is folded into dX with one addmm instead of a second [M, K] tensor and a sum.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops, checkpointing
from .nf4 import NESTED_BLOCKSIZE, NF4Weight


def _dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                weight_shape, weight_dtype, dtype) -> Tensor:  # fmt: skip
    """deq(W) [N, K] in `dtype`: dequantized to the stored dtype first, so values equal
    NF4Weight.dequantize() exactly, then cast (a no-op when the dtypes agree)."""
    w = _ops.nf4_dequantize(
        packed, absmax, blocksize, weight_shape, weight_dtype,
        nested_absmax, nested_code, nested_offset, nested_blocksize,
    )  # fmt: skip
    return w if w.dtype == dtype else w.to(dtype)


#: Device types where an adapter gradient is formed in its parameter dtype by the GEMM itself
#: (aten::mm.dtype: cuBLAS writes its fp32 accumulator as fp32) instead of a half-precision product
#: and a cast: one launch fewer per gradient (~12 per Llama decoder layer and step), and the
#: gradient is no longer rounded to bf16 on its way to the fp32 parameter. CPU PyTorch has no
#: aten::mm.dtype kernel.
GRADIENT_MM_OUT_DTYPE_DEVICES: tuple[str, ...] = ("cuda",)


def mm_as(a: Tensor, b: Tensor, dtype: torch.dtype, scale: float | None = None) -> Tensor:
    """a·b (times `scale`) as a `dtype` tensor, for the adapters' gradients: a and b are
    activations (fp16/bf16), `dtype` the parameter's (usually fp32). Where
    GRADIENT_MM_OUT_DTYPE_DEVICES allows, the GEMM writes `dtype` directly from its fp32
    accumulator; elsewhere the product in a's dtype, scaled there, then cast (the former rule)."""
    if (dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype
            and a.device.type in GRADIENT_MM_OUT_DTYPE_DEVICES):  # fmt: skip
        out = torch.mm(a, b, out_dtype=dtype)
    else:
        out = torch.mm(a, b)
    if scale is not None and scale != 1:  # × 1 (alpha = r, a common choice) would launch to change nothing
        out.mul_(scale)
    return out.to(dtype)


# ---- qlora_ext::nf4_linear ---------------------------------------------------------------------


def _nf4_linear_impl(
    x: Tensor,  # [..., K]
    packed: Tensor,  # uint8 [(N*K+1)//2, 1]
    absmax: Tensor,  # fp32 [n_blocks], or uint8 codes when nested
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    nested_offset: Optional[Tensor],  # fp32 [1]
    blocksize: int,
    nested_blocksize: int,
    weight_shape: list[int],  # [N, K]
    weight_dtype: torch.dtype,
    bias: Optional[Tensor],  # [N]
) -> Tensor:  # [..., N]
    w = _dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                    nested_blocksize, weight_shape, weight_dtype, x.dtype)  # fmt: skip
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


_nf4_linear = torch.library.custom_op("qlora_ext::nf4_linear", mutates_args=())(_nf4_linear_impl)


@_nf4_linear.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
      weight_shape, weight_dtype, bias):  # fmt: skip
    torch._check(len(weight_shape) == 2, lambda: f"weight_shape must be [N, K], got {weight_shape}")
    torch._check(x.shape[-1] == weight_shape[1], lambda: f"x has {x.shape[-1]} features, W expects {weight_shape[1]}")
    return x.new_empty((*x.shape[:-1], weight_shape[0]))


def _nf4_linear_setup(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, wdtype, bias = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, nested_offset)
    ctx.quant = (blocksize, nested_blocksize, shape, wdtype)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _nf4_linear_backward(ctx, dy):
    packed, absmax, nested_absmax, nested_code, nested_offset = ctx.saved_tensors
    blocksize, nested_blocksize, shape, wdtype = ctx.quant
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        w = _dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                        nested_blocksize, shape, wdtype, ctx.x_dtype)  # fmt: skip
        dx = dy @ w  # [..., N]·[N, K]
    if ctx.needs_input_grad[10]:
        dbias = dy.reshape(math.prod(dy.shape[:-1]), dy.shape[-1]).sum(0).to(ctx.bias_dtype)
    return dx, None, None, None, None, None, None, None, None, None, dbias


_nf4_linear.register_autograd(_nf4_linear_backward, setup_context=_nf4_linear_setup)


# ---- qlora_ext::nf4_lora_linear ----------------------------------------------------------------


def _nf4_lora_linear_impl(
    x: Tensor,  # [..., K]
    x_lora: Optional[Tensor],  # [..., K] (dropout applied) or None for x
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    nested_offset: Optional[Tensor],
    blocksize: int,
    nested_blocksize: int,
    weight_shape: list[int],
    weight_dtype: torch.dtype,
    bias: Optional[Tensor],
    lora_A: Tensor,  # [r, K]
    lora_B: Tensor,  # [N, r]
    scale: float,
) -> tuple[Tensor, Tensor]:  # y [..., N], xa [..., r]
    xl = x if x_lora is None else x_lora
    w = _dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                    nested_blocksize, weight_shape, weight_dtype, x.dtype)  # fmt: skip
    y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    del w  # the only dense W; gone before the thin products allocate
    xa = F.linear(xl, lora_A.to(x.dtype))  # [..., r]
    m = math.prod(x.shape[:-1])
    # y += s·xa·Bᵀ in place on the fresh output: one [M, N] tensor instead of two.
    y.view(m, weight_shape[0]).addmm_(xa.reshape(m, lora_A.shape[0]), lora_B.to(x.dtype).t(), alpha=scale)
    return y, xa


_nf4_lora_linear = torch.library.custom_op("qlora_ext::nf4_lora_linear", mutates_args=())(_nf4_lora_linear_impl)


def check_lora_args(x: Tensor, weight: NF4Weight, lora_A: Tensor, lora_B: Tensor, x_lora: Tensor | None) -> None:
    """Eager checks of the low-rank wrappers (LoRA, DoRA): each error names the argument."""
    _check_input(x, weight)
    n_out, k = weight.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must be [r, {k}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n_out, lora_A.shape[0]):
        raise ValueError(f"lora_B must be [{n_out}, {lora_A.shape[0]}], got {tuple(lora_B.shape)}")
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(f"x_lora must have the shape of x {tuple(x.shape)}, got {tuple(x_lora.shape)}")


def check_lora_shapes(x, x_lora, weight_shape, lora_A, lora_B) -> tuple[tuple, int, int]:
    """Shape checks shared by the fake kernels of the low-rank ops: (leading dims, N, r)."""
    torch._check(len(weight_shape) == 2, lambda: f"weight_shape must be [N, K], got {weight_shape}")
    n_out, k = weight_shape
    torch._check(x.shape[-1] == k, lambda: f"x has {x.shape[-1]} features, W expects {k}")
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == k, lambda: f"lora_A must be [r, {k}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    torch._check(tuple(lora_B.shape) == (n_out, r), lambda: f"lora_B must be [{n_out}, {r}], got {tuple(lora_B.shape)}")
    if x_lora is not None:
        torch._check(x_lora.shape == x.shape, lambda: "x_lora must have the shape of x")
    return x.shape[:-1], n_out, r


@_nf4_lora_linear.register_fake
def _(x, x_lora, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
      nested_blocksize, weight_shape, weight_dtype, bias, lora_A, lora_B, scale):  # fmt: skip
    lead, n_out, r = check_lora_shapes(x, x_lora, weight_shape, lora_A, lora_B)
    return x.new_empty((*lead, n_out)), x.new_empty((*lead, r))


def _nf4_lora_setup(ctx, inputs, output):
    (x, x_lora, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
     shape, wdtype, bias, lora_A, lora_B, scale) = inputs  # fmt: skip
    _, xa = output
    # xa is an output for DoRA's sake; nothing usually reaches it: no zero-filled gradient for it
    # (the backward takes dxa=None).
    ctx.set_materialize_grads(False)
    ctx.x_is_lora_input = x_lora is None
    xl = x if x_lora is None else x_lora
    ctx.save_for_backward(xl, xa, lora_A, lora_B, packed, absmax, nested_absmax, nested_code, nested_offset)
    ctx.quant = (blocksize, nested_blocksize, shape, wdtype)
    ctx.scale = scale
    ctx.bias_dtype = None if bias is None else bias.dtype


def _nf4_lora_backward(ctx, dy, dxa):
    xl, xa, lora_A, lora_B, packed, absmax, nested_absmax, nested_code, nested_offset = ctx.saved_tensors
    blocksize, nested_blocksize, shape, wdtype = ctx.quant
    need = ctx.needs_input_grad
    s, dtype = ctx.scale, xl.dtype
    n_out, k = shape
    if dy is None:  # only xa received a gradient (grads are not materialised, see setup)
        dy = xa.new_zeros((*xa.shape[:-1], n_out))
    m = math.prod(dy.shape[:-1])
    dy2 = dy.reshape(m, n_out)  # [M, N]
    xl2 = xl.reshape(m, k)  # [M, K]
    xa2 = xa.reshape(m, lora_A.shape[0])  # [M, r] (an explicit r: m may be 0)
    casts = getattr(ctx, "low_rank_casts", None)  # the forward's (keep_low_rank_casts), else cast again
    a, b = casts if casts is not None and casts[0].dtype == dtype else (lora_A.to(dtype), lora_B.to(dtype))

    g = torch.mm(dy2, b)  # [M, r] gradient reaching xa through the LoRA path
    if s != 1:
        g.mul_(s)
    if dxa is not None:  # xa is also an output; honour a gradient that reached it directly
        g = g + dxa.reshape(g.shape)

    dx = dx_lora = d_a = d_b = dbias = None
    if need[0]:
        w = _dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                        nested_blocksize, shape, wdtype, dtype)  # fmt: skip
        dx2 = torch.mm(dy2, w)  # [M, K]
        del w
        if ctx.x_is_lora_input:
            dx2.addmm_(g, a)
        dx = dx2.view(*dy.shape[:-1], k)
    if need[1]:
        dx_lora = torch.mm(g, a).view(*dy.shape[:-1], k)
    if need[11]:
        dbias = dy2.sum(0).to(ctx.bias_dtype)
    if need[12]:
        d_a = mm_as(g.t(), xl2, lora_A.dtype)  # [r, K]
    if need[13]:
        d_b = mm_as(dy2.t(), xa2, lora_B.dtype, s)  # [N, r]
    return dx, dx_lora, None, None, None, None, None, None, None, None, None, dbias, d_a, d_b, None


_nf4_lora_linear.register_autograd(_nf4_lora_backward, setup_context=_nf4_lora_setup)


# ---- eager twins of the operators -------------------------------------------------------------
#
# Calling an operator made with torch.library.custom_op costs ~0.3 ms of Python per call forward
# and as much again backward (its dispatch, default filling and generated autograd node), measured
# on the H100 machine: for Llama-3-8B shapes with checkpointing (672 calls a step) that was more
# host time than the GPU's whole step. Outside torch.compile the layers therefore run the very
# same functions (impl, setup_context, backward) through a plain autograd.Function; under
# torch.compile they call the operators, which the compiler understands through their fakes.


def keep_low_rank_casts(ctx, inputs: tuple) -> tuple:
    """nf4_lora_linear's inputs with lora_A and lora_B cast to x's dtype, the casts also kept on
    `ctx` for its backward, which would otherwise cast them again (two launches fewer a
    projection in a host-bound backward; adapter-sized, alive until the backward). In a
    checkpointed layer's recomputation, the first forward's casts (checkpointing.kept_cast)."""
    x, a, b = inputs[0], inputs[12], inputs[13]
    casts = (checkpointing.kept_cast(a, x.dtype), checkpointing.kept_cast(b, x.dtype))
    ctx.low_rank_casts = casts
    return (*inputs[:12], *casts, *inputs[14:])


def eager_twin(name: str, impl, setup_context, backward, unused_output_impl=None,
               prepare_inputs=None) -> type[torch.autograd.Function]:  # fmt: skip
    """An autograd.Function computing `impl` with the operator's own setup_context/backward.

    Like the operators (which have no autocast kernel, so autocast passes through them and their
    bodies run in x's dtype), the twins run with autocast off: under autocast a caller's fp32 x
    and fp32 adapters stay fp32 here instead of mixing with autocast's bf16 products.
    `unused_output_impl`: what runs instead of `impl` in a recomputation whose outputs nobody reads
    (checkpointing.outputs_unused): the outputs the backward reads, the others uninitialised.
    `prepare_inputs(ctx, inputs)`: the inputs `impl` gets (keep_low_rank_casts); setup_context
    gets the original ones."""

    def forward(ctx, *inputs):
        with _autocast_off(inputs[0].device.type):
            operands = inputs if prepare_inputs is None else prepare_inputs(ctx, inputs)
            skip = unused_output_impl is not None and checkpointing.projection_outputs_unused()
            output = (unused_output_impl if skip else impl)(*operands)
            setup_context(ctx, inputs, output)
        ctx.device_type = inputs[0].device.type
        return output

    def backward_(ctx, *grads):
        with _autocast_off(ctx.device_type):
            return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward_),
    })  # fmt: skip


def _autocast_off(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


_EagerNF4Linear = eager_twin("_EagerNF4Linear", _nf4_linear_impl, _nf4_linear_setup, _nf4_linear_backward)


def _nf4_lora_linear_unused_output(x, x_lora, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                   nested_blocksize, weight_shape, weight_dtype, bias, lora_A, lora_B, scale):  # fmt: skip
    """_nf4_lora_linear_impl where y is never read (attention_replay's o_proj): xa only, which the
    backward reads; no dequantization, no GEMM."""
    xl = x if x_lora is None else x_lora
    return x.new_empty((*x.shape[:-1], weight_shape[0])), F.linear(xl, lora_A.to(x.dtype))


_EagerNF4LoRALinear = eager_twin("_EagerNF4LoRALinear", _nf4_lora_linear_impl, _nf4_lora_setup, _nf4_lora_backward,
                                 _nf4_lora_linear_unused_output, keep_low_rank_casts)  # fmt: skip


def use_operators() -> bool:
    """True under torch.compile (the graph needs the registered operators), else the eager twins."""
    return torch.compiler.is_compiling()


# ---- Python entry points -------------------------------------------------------------------------


def _weight_args(weight: NF4Weight) -> tuple:
    """The quantized tensors and fields of `weight`, in the operators' argument order."""
    nested = weight.nested
    return (
        weight.packed,
        weight.absmax,
        nested.absmax2 if nested else None,
        nested.code if nested else None,
        nested.offset.reshape(1) if nested else None,
        weight.blocksize,
        nested.blocksize if nested else NESTED_BLOCKSIZE,
        list(weight.shape),
        weight.dtype,
    )


def _check_input(x: Tensor, weight: NF4Weight) -> None:
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim, the weight expects {weight.shape[1]}")


def nf4_linear(x: Tensor, weight: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """y [..., N] = x [..., K] · deq(W)ᵀ (+ bias), differentiable in x and bias.

    Inference (`_ops.linear_route`: CUDA, fp16/bf16, no gradient) takes the fused nf4_gemv for
    <= 16 rows and nf4_gemm for 17..64 rows: both read the 4-bit weight once instead of
    materialising deq(W)."""
    _check_input(x, weight)
    route = _ops.linear_route(x, weight, bias, caller="nf4_linear")
    if route != _ops.ROUTE_DENSE:
        return _ops.fused_linear(x, weight, bias, route)
    if use_operators():
        return torch.ops.qlora_ext.nf4_linear(x, *_weight_args(weight), bias)
    return _EagerNF4Linear.apply(x, *_weight_args(weight), bias)


def nf4_lora_linear(
    x: Tensor,
    weight: NF4Weight,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    x_lora: Tensor | None = None,
) -> Tensor:
    """y [..., N] = x·deq(W)ᵀ (+ bias) + scale·(x_lora·Aᵀ)·Bᵀ with A [r, K], B [N, r].

    `x_lora` is the input of the low-rank path (x after dropout); None means x itself.
    Differentiable in x, x_lora, bias, A and B; never in W.
    """
    check_lora_args(x, weight, lora_A, lora_B, x_lora)
    route = _ops.linear_route(x, weight, bias, trainable=(lora_A, lora_B), caller="nf4_lora_linear")
    if route != _ops.ROUTE_DENSE:
        return nf4_lora_decode(x, weight, bias, lora_A, lora_B, scale, x_lora)
    wargs = _weight_args(weight)
    op = torch.ops.qlora_ext.nf4_lora_linear if use_operators() else _EagerNF4LoRALinear.apply
    y, _ = op(x, x_lora, *wargs, bias, lora_A, lora_B, float(scale))
    return y



def nf4_lora_decode(
    x: Tensor,
    weight: NF4Weight,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    x_lora: Tensor | None = None,
) -> Tensor:
    """Inference-only `nf4_lora_linear` where `linear_route` picks a fused op (no autograd).

    y = nf4_gemv(x, W) (+ bias) (nf4_gemm above 16 rows), then y += scale·(x_lora·Aᵀ)·Bᵀ with A, B
    in x's dtype, as the training op computes it: three kernels per layer (the fused GEMV, one thin GEMM, one addmm
    into y), which matters when a 32-layer model runs ~200 adapted layers per token. Inside
    `cast_adapters_once()` (generate) A and B are cast to x's dtype once per call instead of per
    token. Every shape is fixed by x's and nothing reads tensor values on the host: safe to
    capture in a CUDA graph.
    """
    with _autocast_off(x.device.type):
        rows = math.prod(x.shape[:-1])
        route = _ops.ROUTE_GEMV if rows <= _ops.NF4_GEMV_MAX_ROWS else _ops.ROUTE_GEMM
        y = _ops.fused_linear(x, weight, bias, route)  # [..., N], x's dtype, a fresh tensor
        xl = x if x_lora is None else x_lora
        m = rows
        xa = F.linear(xl, _adapter_in(lora_A, x.dtype))  # [..., r]
        y.view(m, weight.shape[0]).addmm_(xa.reshape(m, lora_A.shape[0]), _adapter_in(lora_B, x.dtype).t(), alpha=scale)
        return y


# Adapter tensors cast to a compute dtype, kept while `cast_adapters_once` is active:
# (id of the adapter tensor, dtype) -> (the tensor, its cast). None: cast on every call.
_adapter_casts: dict | None = None


@contextlib.contextmanager
def cast_adapters_once():
    """Within this context the decode route casts each adapter tensor to the compute dtype once
    and reuses the copy (fp32 adapters, bf16 activations: otherwise every token reads 4 and writes
    2 bytes per adapter parameter, and launches a cast kernel per tensor). The adapters must not
    change inside the context: `generate` holds it for one call, under inference_mode."""
    global _adapter_casts
    outer, _adapter_casts = _adapter_casts, {} if _adapter_casts is None else _adapter_casts
    try:
        yield
    finally:
        _adapter_casts = outer


def _adapter_in(t: Tensor, dtype: torch.dtype) -> Tensor:
    if t.dtype == dtype:
        return t
    if _adapter_casts is None:
        return t.to(dtype)
    key = (id(t), dtype)
    hit = _adapter_casts.get(key)
    if hit is None or hit[0] is not t:
        hit = _adapter_casts[key] = (t, t.to(dtype))
    return hit[1]
