"""Pure-PyTorch references of every operator: readable, slow, and the ground truth of the tests.

They follow DESIGN.md §3 literally and compute in fp32 (the format's own arithmetic), so a
kernel is expected to match them bit for bit except where a comment says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .codebooks import nf4_code

MIN_ABSMAX = 1e-38  # an all-zero block divides by this, so its codes are 7 (0.0), never NaN


def _blocks(x_flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[n] -> [n_blocks, blocksize], zero-padded."""
    n = x_flat.numel()
    n_blocks = -(-n // blocksize)
    return torch.nn.functional.pad(x_flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)


def _absmax(blocks: torch.Tensor) -> torch.Tensor:
    absmax = blocks.abs().amax(dim=1)
    return torch.where(blocks.isnan().any(dim=1), torch.nan, absmax)


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted map; a value exactly on a midpoint takes the lower."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, right=False)


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    x = weight.reshape(-1).float()
    n = x.numel()
    blocks = _blocks(x, blocksize)
    absmax = _absmax(blocks)
    inv = 1.0 / absmax.clamp(min=MIN_ABSMAX)
    scaled = (blocks * inv[:, None]).clamp(-1, 1).reshape(-1)
    codes = _nearest_code(scaled, nf4_code(x.device)).to(torch.uint8)[: n + (n % 2)]
    if n % 2:
        codes[-1] = 7  # padding nibble: the code of 0.0
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.view(-1, 1), absmax


def nested_absmax(
    absmax_codes: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    nested_offset: torch.Tensor,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """Decoded fp32 block scales of a double-quantized tensor (two fp32 roundings)."""
    values = nested_code[absmax_codes.long().reshape(-1)]
    scale = nested_absmax.repeat_interleave(nested_blocksize)[: values.numel()]
    return (values * scale) + nested_offset.reshape(())


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax_: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    n = math.prod(shape)
    if nested_absmax_ is not None:
        absmax = nested_absmax(absmax, nested_absmax_, nested_code, nested_offset, nested_blocksize)
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n].long()
    values = nf4_code(packed.device)[codes]
    scales = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scales).to(dtype).reshape(tuple(shape))


def nf4_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    weight_shape: Sequence[int],
    bias: torch.Tensor | None = None,
    nested_absmax_: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """fp32 `x @ deq(W).T + bias` with W dequantized in fp32: the exact product nf4 * scale.

    Returns fp32 (not x's dtype): it is the high-precision side of the tests' error comparison.
    The kernels may hold the weight in x's dtype (rounding nf4 * scale, or nf4 before the scale);
    that rounding is part of their error, as it is part of plain PyTorch's (x @ deq(W, x.dtype).T)
    that the tests compare it with. (Until nf4_gemv's factored CUDA variants, this dequantized to
    x's dtype, which charged a kernel that did not round W exactly that way for being more exact.)
    """
    w = nf4_dequantize(
        packed, absmax, blocksize, weight_shape, torch.float32, nested_absmax_, nested_code, nested_offset, nested_blocksize
    )
    y = x.float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    return y


def blockwise8_quantize(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 256, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1).float()
    if offset is not None:
        flat = flat - offset.reshape(()).float()
    blocks = _blocks(flat, blocksize)
    absmax = _absmax(blocks)
    inv = 1.0 / absmax.clamp(min=MIN_ABSMAX)
    scaled = (blocks * inv[:, None]).clamp(-1, 1).reshape(-1)[: flat.numel()]
    return _nearest_code(scaled, code.float()).to(torch.uint8).reshape(x.shape), absmax


def blockwise8_dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    flat = codes.reshape(-1).long()
    scales = absmax.repeat_interleave(blocksize)[: flat.numel()]
    return (code[flat] * scales).reshape(codes.shape)


# ---- transformer-block operators (qlora_ext.block_ops) ------------------------------------------


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, cast_before_weight: bool = True, input_dtype=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y fp32 [..., D], inv_rms fp32 [rows]) of RMSNorm, computed in fp32 and left unrounded.

    cast_before_weight (transformers' LlamaRMSNorm): the normalised row is rounded to the input
    dtype before the weight multiplies it; otherwise the product is formed in fp32. `input_dtype`
    (default x.dtype) is that rounding's dtype, so an fp32 copy of a 16-bit x gives the same values
    with fp32 gradients."""
    input_dtype = x.dtype if input_dtype is None else input_dtype
    x32 = x.float()
    inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    normed = x32 * inv_rms
    if cast_before_weight:
        normed = normed.to(input_dtype).float()
    return weight.float() * normed, inv_rms.reshape(-1)


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, inv_rms: torch.Tensor, cast_before_weight: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of rms_norm in fp32, by the closed form (qlora/rms_norm.h):
    dx = r * (g - n * mean(g * n)), g = dy * w, n = x * r;  dweight = sum over rows of dy * m."""
    D = x.shape[-1]
    x32, dy32 = x.float().reshape(-1, D), dy.float().reshape(-1, D)
    r = inv_rms.float().reshape(-1, 1)
    n = x32 * r
    g = dy32 * weight.float()
    dx = r * (g - n * (g * n).mean(-1, keepdim=True))
    m = n.to(x.dtype).float() if cast_before_weight else n
    return dx.reshape(x.shape), (dy32 * m).sum(0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate_half_transposed(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([x[..., half:], -x[..., :half]], dim=-1)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (q*cos + rotate_half(q)*sin, the same for k); q [B, Hq, T, Dh], cos, sin [1 or B, T, Dh].
    transpose: the transposed map d*cos + rotate_halfᵀ(d*sin) (the backward)."""
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)

    def one(x):
        x = x.float()
        if transpose:
            return x * c + rotate_half_transposed(x * s)
        return x * c + rotate_half(x) * s

    return one(q), one(k)


def rope_append_kv(q, k, v, cos, sin, key_cache, value_cache, length):
    """(rope(q) in q's dtype, key_cache and value_cache after the write, length + T) as new
    tensors: rope(k) (fp32, rounded to the cache's dtype) and v at slots [length, length + T)."""
    q_out, k_out = rope(q, k, cos, sin)
    start, T = int(length.reshape(-1)[0]), q.shape[2]
    keys, values = key_cache.clone(), value_cache.clone()
    keys[:, :, start : start + T] = k_out.to(keys.dtype)
    values[:, :, start : start + T] = v.to(values.dtype)
    return q_out.to(q.dtype), keys, values, length + T


def decode_attention(q, key_cache, value_cache, length, mask, scale):
    """fp32 [B, 1, Hq, D]: each query head h attends over slots [0, length) of K/V head h // G,
    softmax(scale * q·kᵀ + mask)·v (bool masks exclude False slots); zeros where nothing is allowed."""
    B, Hq, _, D = q.shape
    Hk, L = key_cache.shape[1], key_cache.shape[2]
    filled = int(length.reshape(-1)[0])
    k = key_cache.float()[:, :, :filled].repeat_interleave(Hq // Hk, dim=1)  # [B, Hq, P, D]
    v = value_cache.float()[:, :, :filled].repeat_interleave(Hq // Hk, dim=1)
    scores = (q.float() * scale) @ k.transpose(2, 3)  # [B, Hq, 1, P]
    if mask is not None:
        m = mask[..., :filled]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    allowed = torch.isfinite(scores) | (scores > 0)
    out = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v
    out = torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))
    return out.transpose(1, 2)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """fp32 silu(gate) * up."""
    return torch.nn.functional.silu(gate.float()) * up.float()


def nf4_gemv_swiglu(x: torch.Tensor, gate_args: Sequence, up_args: Sequence, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 silu(x·deq(gate)ᵀ + bias[:N]) * (x·deq(up)ᵀ + bias[N:]) with nf4_gemv's exact products;
    gate_args / up_args: nf4_gemv's arguments after x and before bias (packed, absmax, blocksize,
    weight_shape), then its nested ones."""
    n = int(gate_args[3][0])
    gate = nf4_gemv(x, *gate_args[:4], None if bias is None else bias[:n], *gate_args[4:])
    up = nf4_gemv(x, *up_args[:4], None if bias is None else bias[n:], *up_args[4:])
    return swiglu(gate, up)


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (dgate, dup) = (dh * up * s * (1 + g * (1 - s)), dh * silu(g)), s = sigmoid(g)."""
    g, u, d = gate.float(), up.float(), dh.float()
    s = torch.sigmoid(g)
    return d * u * s * (1 + g * (1 - s)), d * g * s


def column_scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ⊙ scale [last dim] in fp32, rounded to x's dtype (as qlora_ext::dora_column_scale stores it)."""
    return (x.float() * scale.float()).to(x.dtype)


def swiglu_scaled(gate: torch.Tensor, up: torch.Tensor, gate_scale: torch.Tensor, up_scale: torch.Tensor) -> torch.Tensor:
    """fp32 swiglu of the column-scaled operands, each rounded to its dtype first."""
    return swiglu(column_scaled(gate, gate_scale), column_scaled(up, up_scale))


def swiglu_scaled_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_scale: torch.Tensor,
                           up_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """fp32 gradients for the scaled operands (not for gate and up)."""
    return swiglu_backward(dh, column_scaled(gate, gate_scale), column_scaled(up, up_scale))
