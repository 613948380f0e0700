"""LoRA-FA (Zhang et al. 2023, arXiv 2308.03303): LoRA with the down-projection A frozen.

    y = x·deq(W)ᵀ (+ bias) + s·(x·Aᵀ)·Bᵀ,   A [r, in] frozen at its random init, B [out, r] trained

Why: B's gradient is s·dyᵀ·(x·Aᵀ) and x's is dy·W + s·(dy·B)·A, so backward needs only
xa = x·Aᵀ [M, r], not x [M, in]. Here neither path keeps x: the base op `nf4_linear` saves only
the quantized weight, and the low-rank path is `_FrozenALowRank`, which saves xa, A and B.
Per layer that is M·r instead of M·in activation elements (plain LoRA keeps x for A's gradient).
With dropout > 0 the dropout mask [M, in] is still kept (by the dropout op), so the saving is
partial; the paper's setting has none.

This is LoRA-FA v1 (frozen A, plain optimizer on B). PEFT's LoRA-FA optimizer (v2) additionally
projects B's gradient, g_B·(A·Aᵀ)⁻¹/s²; that is an optimizer choice, not part of this adapter.

On disk: PEFT's LoRA format (A and B, so the frozen random A needs no seed) plus
`"qlora_ext_method": "lora_fa"` in adapter_config.json, so that our loader freezes A again.
PEFT (>= 0.14 ignores the unknown key with a warning) loads it as a plain LoRA with the same output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .adapters import LoRAAdapter
from .lora_linear import mm_as, nf4_linear


class _FrozenALowRank(torch.autograd.Function):
    """y [..., N] = s·(x·Aᵀ)·Bᵀ with A [r, K] constant: saves xa [..., r], A and B, never x."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
        xa = x @ a.to(x.dtype).t()  # [..., r]
        ctx.save_for_backward(xa, a, b)
        ctx.scale = scale
        return (xa @ b.to(x.dtype).t()) * scale

    @staticmethod
    def backward(ctx, dy: Tensor):
        xa, a, b = ctx.saved_tensors
        s, dtype = ctx.scale, dy.dtype
        m = math.prod(dy.shape[:-1])
        dy2 = dy.reshape(m, dy.shape[-1])  # [M, N]
        dx = db = None
        if ctx.needs_input_grad[0]:
            g = torch.mm(dy2, b.to(dtype))  # [M, r]
            if s != 1:
                g.mul_(s)
            dx = torch.mm(g, a.to(dtype)).view(*dy.shape[:-1], a.shape[1])
        if ctx.needs_input_grad[2]:
            db = mm_as(dy2.t(), xa.reshape(m, a.shape[0]), b.dtype, s)  # [N, r]
        return dx, None, db, None


class LoRAFAAdapter(LoRAAdapter):
    """LoRA-FA: `LoRAAdapter` whose `lora_A` is frozen (requires_grad False) at its kaiming init."""

    method = "lora_fa"

    def __init__(self, in_features: int, out_features: int, r: int = 16, alpha: float = 16,
                 dropout: float = 0.0, rslora: bool = False, device=None, dtype: torch.dtype | None = None):  # fmt: skip
        super().__init__(in_features, out_features, r, alpha, dropout, rslora, device=device, dtype=dtype)
        self.lora_A.weight.requires_grad_(False)

    def mark_trainable(self) -> None:
        self.lora_A.weight.requires_grad_(False)
        self.lora_B.weight.requires_grad_(True)

    def forward_with_base(self, layer, x: Tensor) -> Tensor:
        x_lora = self.dropout(x) if self.training and self.dropout_p > 0 else x
        y = nf4_linear(x, layer.weight, layer.bias)
        return y + _FrozenALowRank.apply(x_lora, self.lora_A.weight, self.lora_B.weight, self.scale)

    @classmethod
    def peft_model_config(cls, layer_configs: dict[str, dict]) -> dict:
        return {**super().peft_model_config(layer_configs), "qlora_ext_method": cls.method}
