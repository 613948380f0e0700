"""DoRA (Liu et al. 2024, arXiv 2402.09353) on an NF4 base: weight-decomposed low-rank adaptation.

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row        y = x·W'ᵀ (+ bias)

m [out] is trainable (PEFT's `lora_magnitude_vector`), initialised to the row norms ‖W_i‖ (B = 0
at init); the norm n [out] is taken over each output row (dim 1 of W [out, in], as PEFT does) and
is detached, i.e. a constant in backward (paper §4.3). Nothing [out, in] is formed besides the
transient dequantized W that the base GEMM makes anyway:

    y = (m / n) ⊙ z (+ bias),   z = x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ           (one fused op, below)
    n_i² = ‖W_i‖² + 2s·⟨W_i, (BA)_i⟩ + s²·‖(BA)_i‖²
         = ‖W_i‖² + 2s·Σ_j B_ij·(W·Aᵀ)_ij + s²·(B·(A·Aᵀ) ⊙ B)_i·1

- ‖W_i‖² [out] is computed once per NF4 weight (W is frozen) and cached.
- W·Aᵀ [out, r] changes every step (A trains); the op `qlora_ext::nf4_dora_linear` takes it from
  the dequantized W the forward GEMM already holds: cost 2·out·in·r FLOPs per forward
  (r/M of the base GEMM's 2·M·out·in; 0.8% at r = 16, M = 2048), no extra dequantization.
- A·Aᵀ [r, r] and the row sums cost O(out·r² + in·r²): six small kernels per forward
  (the fp32 cast of wa, A·Aᵀ, one addmm, one row dot, +‖W‖², rsqrt), plus m/n and the scaling.
- Backward is LoRA's (the norm is constant); m's gradient is Σ_M dy ⊙ z / n, so z [M, out] is
  kept for backward (one activation the size of the layer output, as in PEFT).

Dropout: with dropout > 0 in training the low-rank path sees dropout(x), the base path x:
z = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ. (PEFT instead computes x·Wᵀ + (m/n − 1)·dropout(x)·Wᵀ + …, a
second dense GEMM; both agree in eval and with dropout 0.)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpointing
from .adapters import LoRAAdapter
from .lora_linear import (_dequantize, _nf4_lora_backward, _nf4_lora_setup, _weight_args, check_lora_args,
                          check_lora_shapes, eager_twin, nf4_lora_linear, use_operators)  # fmt: skip
from .nf4 import NF4Weight

# ---- qlora_ext::nf4_dora_linear ----------------------------------------------------------------


def _nf4_dora_linear_impl(
    x: Tensor,  # [..., K]
    x_lora: Optional[Tensor],  # [..., K] input of the low-rank path (None: x)
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    nested_offset: Optional[Tensor],
    blocksize: int,
    nested_blocksize: int,
    weight_shape: list[int],  # [N, K]
    weight_dtype: torch.dtype,
    bias: Optional[Tensor],  # [N]
    lora_A: Tensor,  # [r, K]
    lora_B: Tensor,  # [N, r]
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # z [..., N], xa [..., r], wa = deq(W)·Aᵀ [N, r]
    xl = x if x_lora is None else x_lora
    w = _dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                    nested_blocksize, weight_shape, weight_dtype, x.dtype)  # fmt: skip
    a = lora_A.to(x.dtype)
    z = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    wa = torch.mm(w, a.t())  # [N, r], from the W already dequantized for the GEMM
    del w
    xa = F.linear(xl, a)  # [..., r]
    m = math.prod(x.shape[:-1])
    z.view(m, weight_shape[0]).addmm_(xa.reshape(m, -1), lora_B.to(x.dtype).t(), alpha=scale)
    return z, xa, wa


_nf4_dora_linear = torch.library.custom_op("qlora_ext::nf4_dora_linear", mutates_args=())(_nf4_dora_linear_impl)


@_nf4_dora_linear.register_fake
def _(x, x_lora, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
      nested_blocksize, weight_shape, weight_dtype, bias, lora_A, lora_B, scale):  # fmt: skip
    lead, n_out, r = check_lora_shapes(x, x_lora, weight_shape, lora_A, lora_B)
    return x.new_empty((*lead, n_out)), x.new_empty((*lead, r)), x.new_empty((n_out, r))


def _nf4_dora_setup(ctx, inputs, output):
    z, xa, wa = output
    _nf4_lora_setup(ctx, inputs, (z, xa))
    ctx.mark_non_differentiable(wa)  # only feeds the (detached) norm


def _nf4_dora_backward(ctx, dz, dxa, dwa):
    # z and xa are exactly nf4_lora_linear's outputs, with the same inputs: same gradients.
    return _nf4_lora_backward(ctx, dz, dxa)


_nf4_dora_linear.register_autograd(_nf4_dora_backward, setup_context=_nf4_dora_setup)
# Outside torch.compile the same functions run as a plain autograd.Function (lora_linear.py says why).
_EagerNF4DoRALinear = eager_twin("_EagerNF4DoRALinear", _nf4_dora_linear_impl, _nf4_dora_setup, _nf4_dora_backward)


def nf4_dora_linear(
    x: Tensor,
    weight: NF4Weight,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    x_lora: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(z, wa): z [..., N] = x·deq(W)ᵀ + scale·(x_lora·Aᵀ)·Bᵀ (no bias), differentiable in x,
    x_lora, A, B; wa [N, r] = deq(W)·Aᵀ, not differentiable (it feeds DoRA's detached norm)."""
    check_lora_args(x, weight, lora_A, lora_B, x_lora)
    op = torch.ops.qlora_ext.nf4_dora_linear if use_operators() else _EagerNF4DoRALinear.apply
    z, _, wa = op(x, x_lora, *_weight_args(weight), None, lora_A, lora_B, float(scale))
    return z, wa


# ---- the adapter --------------------------------------------------------------------------------


class DoRAAdapter(LoRAAdapter):
    """DoRA: LoRA's A [r, in], B [out, r] and scale s, plus a trainable magnitude m [out]
    (`lora_magnitude_vector`, PEFT's on-disk key). See the module docstring for the math."""

    method = "dora"

    def __init__(self, in_features: int, out_features: int, r: int = 16, alpha: float = 16,
                 dropout: float = 0.0, rslora: bool = False, device=None, dtype: torch.dtype | None = None):  # fmt: skip
        super().__init__(in_features, out_features, r, alpha, dropout, rslora, device=device, dtype=dtype)
        # 1 until init_magnitude(layer) (prepare) or a loaded file sets it
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
        self._weight_sq: Tensor | None = None  # ‖deq(W)_i‖² [out] fp32, for the NF4 weight in _weight_key
        self._weight_key: tuple | None = None
        self._merge_norm: Tensor | None = None  # n at merge time, so unmerge can invert it
        # 1/n of each call in a checkpointed layer's first forward, for its recomputation (FIFO:
        # a layer replays its calls in order)
        self._replay: list[tuple[int, Tensor]] = []

    # ---- norms ---------------------------------------------------------------------------------

    def weight_sq_norm(self, layer) -> Tensor:
        """‖deq(W)_i‖² [out] (fp32) of `layer`'s frozen NF4 weight: dequantized once, then cached
        until the layer's weight object or device changes (load_state_dict, merge, .to())."""
        key = (id(layer.weight), layer.weight.device)
        if self._weight_sq is None or self._weight_key != key:
            self._weight_sq = layer.weight.dequantize().float().square().sum(1)
            self._weight_key = key
        return self._weight_sq

    def init_magnitude(self, layer) -> None:
        """m ← ‖deq(W) + s·BA‖_row (= ‖deq(W)‖_row while B = 0), as PEFT initialises it."""
        with torch.no_grad():
            w = layer.weight.dequantize().float()
            self.lora_magnitude_vector.copy_(self._dense_row_norm(w))

    def _dense_row_norm(self, w: Tensor) -> Tensor:
        ba = self.lora_B.weight.float() @ self.lora_A.weight.float()  # [out, in]: init/merge only
        return torch.linalg.vector_norm(w + self.scale * ba.to(w.device), dim=1)

    def weight_norm_sq(self, layer, wa: Tensor) -> Tensor:
        """n² = ‖deq(W) + s·BA‖²_row [out] (fp32, no grad) from wa = deq(W)·Aᵀ [out, r], without
        forming anything [out, in]: n² = ‖W‖² + Σ_j B_ij·(2s·wa + s²·B·(A·Aᵀ))_ij.
        Six small kernels (the forward is launch-bound at small M, so they are counted)."""
        with torch.no_grad():
            a, b, s = self.lora_A.weight.float(), self.lora_B.weight.float(), self.scale
            t = torch.addmm(wa.float(), b, a @ a.t(), beta=2 * s, alpha=s * s)  # [out, r]
            return torch.linalg.vecdot(b, t).add_(self.weight_sq_norm(layer))

    def weight_norm(self, layer, wa: Tensor) -> Tensor:
        """n = ‖deq(W) + s·BA‖_row [out] (fp32, no grad); see weight_norm_sq."""
        return self.weight_norm_sq(layer, wa).clamp_min_(0).sqrt_()

    # ---- forward ------------------------------------------------------------------------------

    def forward_with_base(self, layer, x: Tensor) -> Tensor:
        x_lora = self.dropout(x) if self.training and self.dropout_p > 0 else None
        stage = checkpointing.phase()
        inv_norm = self._replayed_inv_norm(stage)
        if inv_norm is not None:
            # The recomputation of a checkpointed layer: same parameters as its first forward, so
            # the same norm. Reusing it skips deq(W)·Aᵀ and the norm's small kernels (host time).
            z = nf4_lora_linear(x, layer.weight, None, self.lora_A.weight, self.lora_B.weight, self.scale, x_lora)
        else:
            z, wa = nf4_dora_linear(x, layer.weight, self.lora_A.weight, self.lora_B.weight, self.scale, x_lora)
            inv_norm = self.weight_norm_sq(layer, wa).rsqrt_()  # 1/n, detached: a constant in backward
            if stage is not None and stage[0] == "forward":
                self._replay.append((stage[1], inv_norm))
        y = z * (self.lora_magnitude_vector * inv_norm).to(z.dtype)
        return y if layer.bias is None else y + layer.bias.to(y.dtype)

    def _replayed_inv_norm(self, stage) -> Tensor | None:
        """1/n saved by this call's first forward when `stage` is its recomputation, else None.
        Entries of other checkpointed calls (a forward whose backward never ran) are dropped."""
        if stage is None or stage[0] != "recompute":
            return None
        while self._replay:
            token, inv_norm = self._replay.pop(0)
            if token == stage[1]:
                return inv_norm
        return None

    def delta(self, x: Tensor) -> Tensor:
        raise NotImplementedError("DoRA rescales the base weight, so it has no additive delta(x); "
                                  "use forward_with_base(layer, x)")  # fmt: skip

    def delta_weight(self) -> Tensor:
        raise NotImplementedError("DoRA's update depends on W: use merged_weight(w)")

    def merged_weight(self, w: Tensor) -> Tensor:
        """W' = m / ‖W + s·BA‖_row ⊙ (W + s·BA), w [out, in] fp32."""
        ba = (self.lora_B.weight.float() @ self.lora_A.weight.float()).to(w.device)
        v = w + self.scale * ba
        norm = torch.linalg.vector_norm(v, dim=1)
        self._merge_norm = norm
        return v * (self.lora_magnitude_vector.detach().float().to(w.device) / norm)[:, None]

    def unmerged_weight(self, w: Tensor) -> Tensor:
        if self._merge_norm is None:
            raise RuntimeError("DoRA: unmerged_weight needs the norm recorded by merged_weight")
        ba = (self.lora_B.weight.float() @ self.lora_A.weight.float()).to(w.device)
        m = self.lora_magnitude_vector.detach().float().to(w.device)
        return w * (self._merge_norm / m)[:, None] - self.scale * ba

    # ---- config ---------------------------------------------------------------------------------

    @classmethod
    def peft_model_config(cls, layer_configs: dict[str, dict]) -> dict:
        return {**super().peft_model_config(layer_configs), "use_dora": True}
