"""DoRA (Liu et al. 2024, arXiv 2402.09353) on an NF4 base: weight-decomposed low-rank adaptation.

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row        y = x·W'ᵀ (+ bias)

m [out] is trainable (PEFT's `lora_magnitude_vector`), initialised to the row norms ‖W_i‖ (B = 0
at init); the norm n [out] is taken over each output row (dim 1 of W [out, in], as PEFT does) and
is detached, i.e. a constant in backward (paper §4.3). Nothing [out, in] is formed besides the
transient dequantized W that the base GEMM makes anyway:

    y = c ⊙ z (+ bias),   c = m / n,   z = x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ
    n_i² = ‖W_i‖² + 2s·⟨W_i, (BA)_i⟩ + s²·‖(BA)_i‖²
         = ‖W_i‖² + Σ_j B_ij·(2s·W·Aᵀ + s²·B·(A·Aᵀ))_ij

The whole layer is one autograd unit, `qlora_ext::nf4_dora_linear` (and its eager twin, see
lora_linear.py: the operator's dispatch costs ~0.3 ms a call, and training is host-bound, so every
small op per layer counts):
- ‖W_i‖² [out] is computed once per NF4 weight (W is frozen), cached by the adapter, passed in.
- wa = W·Aᵀ [out, r] changes every step (A trains); it comes from the dequantized W the forward
  GEMM already holds: 2·out·in·r FLOPs (r/M of the base GEMM; 0.8% at r = 16, M = 2048), or on
  NORM_FROM_CODES_DEVICES from the NF4 codes by nf4_gemv (`weight_times_a`; off by default).
- n² and c = m/n then take one native kernel, `qlora_ext::dora_scale` (plus A·Aᵀ [r, r]; math in
  qlora/dora.h), where the same math in ATen is six launches; y = z·c (+ bias) in one pass,
  `qlora_ext::dora_column_scale` on COLUMN_SCALE_DEVICES (16-byte accesses; PyTorch's
  broadcasting multiply elsewhere and for narrow outputs).
- Backward is written by hand: `qlora_ext::dora_scale_backward` gives dz = dy·c and
  dm = Σ_rows(dy ⊙ z)/n in one pass over dy and z; then LoRA's backward on dz (the norm is
  constant); dbias = Σ_rows dy. That replaces autograd's graph of the scaling (a mul node saving
  both operands, an expand/sum for m, the cast, the bias add).
- fp64 (gradcheck) takes the plain-PyTorch references of the two native ops.
- z [M, out] is kept for dm (one activation the size of the layer output, as in PEFT).
  Recomputing it instead would cost a second base GEMM in backward (M·out·in MACs, the dominant
  cost of the layer) to save memory that gradient checkpointing already bounds to one block.
- Under gradient checkpointing (qlora_ext.checkpointing) a layer's recomputation reuses the
  (1/n, c) its first forward computed (checkpointing.remember / replayed; `dora_project`'s
  `norm`): the parameters are the same, so are the bits, and W·Aᵀ plus the norm kernel run once
  per step instead of twice.

What is fused, and why (issue #7, QDoRA <= 1.15x QLoRA's step time): on the H100 the step is
host-bound, and the 8B QDoRA step measured +11% GPU time but +65% host time over QLoRA. Besides
this one-unit layer, the SwiGLU MLP's three DoRA projections run as ONE autograd unit with the
activation (fused_mlp.py, the same functions as here: `dora_project`, `_nf4_dora_setup`,
`_nf4_dora_backward`); so do the attention's q/k/v (fused_qkv.py, `_DoRAQKV`: one autograd node
for the three, on fused_qkv.DORA_DEVICES), and o_proj takes this layer.
`benchmarks/bench_host_overhead.py` measures the host time per decoder layer, LoRA vs DoRA.

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

from . import _ops, checkpointing, reference
from ._native import native
from .adapters import LoRAAdapter
from .lora_linear import (
    _dequantize,
    _nf4_lora_backward,
    _weight_args,
    check_lora_args,
    check_lora_shapes,
    eager_twin,
    use_operators,
)
from .nf4 import NF4Weight

# ---- the scale and its backward: native ops, and their plain-PyTorch references ------------------

# The activation dtypes of the native DoRA kernels; others (fp64, for gradcheck) take the reference.
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _row_norm_sq(wa: Tensor, lora_A: Tensor, lora_B: Tensor, weight_sq: Tensor, scale: float) -> Tensor:
    """n² = ‖W + s·BA‖²_row [out] (fp32; fp64 for fp64 wa) from wa = W·Aᵀ [out, r] and ‖W‖² [out]:
    n² = ‖W‖² + Σ_j B_ij·(2s·wa + s²·B·(A·Aᵀ))_ij."""
    dt = torch.float64 if wa.dtype == torch.float64 else torch.float32
    a, b = lora_A.to(dt), lora_B.to(dt)
    t = torch.addmm(wa.to(dt), b, F.linear(a, a), beta=2 * scale, alpha=scale * scale)  # [out, r]; A·Aᵀ symmetric
    return torch.linalg.vecdot(b, t).add_(weight_sq.to(dt))


def dora_scale_reference(wa: Tensor, lora_A: Tensor, lora_B: Tensor, weight_sq: Tensor, magnitude: Tensor,
                         scale: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """qlora_ext::dora_scale in plain PyTorch: (c = m/n [N] in wa's dtype, 1/n [N] fp32, fp64 for
    fp64 wa). A zero row norm gives inf, as the dense formula does."""
    inv_norm = _row_norm_sq(wa, lora_A, lora_B, weight_sq, scale).clamp_min_(0).rsqrt_()
    return (magnitude.to(inv_norm.dtype) * inv_norm).to(wa.dtype), inv_norm


def dora_scale_backward_reference(dy: Tensor, z: Tensor, col_scale: Tensor, inv_norm: Tensor) -> tuple[Tensor, Tensor]:
    """qlora_ext::dora_scale_backward in plain PyTorch: (dz = dy ⊙ c, dm = Σ_rows dy ⊙ z / n in
    inv_norm's dtype)."""
    n = dy.shape[-1]
    rows = (dy.to(inv_norm.dtype) * z.to(inv_norm.dtype)).reshape(math.prod(dy.shape[:-1]), n)
    return dy * col_scale, rows.sum(0) * inv_norm


#: Device types where dora_scale takes A·Aᵀ from qlora's own kernel (one launch: one CTA per entry
#: of its diagonal blocks, deterministic) instead of at::mm, which cuBLAS ran on the H100 as an
#: SGEMM plus a split-K reduction (lora_family_dora_profile_concat_*_h100.txt): on a host-bound
#: step every launch counts. The CPU always takes at::mm. H100 (2026-12-06): dora_scale alone 19.8
#: -> 13.5 µs at [4096, 4096], 23.0 -> 21.5 at [4096, 14336] (bench_dora_kernels.py,
#: dora_kernels_h100.json); QDoRA/QLoRA 1.105 -> 1.094 at 8B, 1.203 -> 1.173 at 1B
#: (bench_lora_family --interleave, lora_family_dora_candidates_{8b,1b}_h100.json); its CUDA tests and the
#: three sanitizers over it passed.
GRAM_KERNEL_DEVICES: tuple[str, ...] = ("cuda",)


def _select_gram_kernel(wa: Tensor) -> None:
    """Sets the native A·Aᵀ switch to GRAM_KERNEL_DEVICES' choice for a CUDA call where it differs
    (read from the switch itself each call: whoever else set it, it never goes stale)."""
    if wa.is_cuda:
        wanted, module = "cuda" in GRAM_KERNEL_DEVICES, native()
        if module._dora_gram_kernel() != wanted:
            module._set_dora_gram_kernel(wanted)


def dora_scale(wa: Tensor, lora_A: Tensor, lora_B: Tensor, weight_sq: Tensor, magnitude: Tensor,
               scale: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(col_scale = m / ‖W + s·B·A‖_row [N] in wa's dtype, inv_norm fp32 [N]) from wa = deq(W)·Aᵀ
    [N, r], A [r, K], B [N, r], ‖deq(W)_i‖² fp32 [N] and m [N]: one native kernel (plus A·Aᵀ)
    where the reference takes six. Not differentiable: the norm is detached, and m's gradient
    comes from dora_scale_backward."""
    if wa.dtype in NATIVE_DTYPES:
        _select_gram_kernel(wa)
        return torch.ops.qlora_ext.dora_scale(wa, lora_A, lora_B, weight_sq, magnitude, float(scale))
    return dora_scale_reference(wa, lora_A, lora_B, weight_sq, magnitude, scale)


def dora_scale_stacked_reference(wa: Tensor, lora_A: Tensor, lora_B: Tensor, weight_sq: Tensor, magnitude: Tensor,
                                 rows: list[int], scales: list[float]) -> tuple[Tensor, Tensor]:  # fmt: skip
    """qlora_ext::dora_scale_stacked in plain PyTorch: dora_scale_reference per stacked layer j (its
    rows of wa, B, ‖W‖², m; its column block of wa; its rows of A), concatenated."""
    r = lora_B.shape[1]
    pieces = [dora_scale_reference(wa_j[:, j * r : (j + 1) * r], lora_A[j * r : (j + 1) * r], b_j, sq_j, m_j, s)
              for j, (wa_j, b_j, sq_j, m_j, s) in enumerate(zip(wa.split(rows), lora_B.split(rows),
                                                                 weight_sq.split(rows), magnitude.split(rows), scales))]  # fmt: skip
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def dora_scale_stacked(wa: Tensor, lora_A: Tensor, lora_B: Tensor, weight_sq: Tensor, magnitude: Tensor,
                       rows: list[int], scales: list[float]) -> tuple[Tensor, Tensor]:  # fmt: skip
    """dora_scale of S <= 4 layers with one rank r at once, their output rows stacked (the
    attention's q, k, v: one A·Aᵀ and one kernel where three of each would run): layer j has
    rows[j] rows and scale scales[j]; wa = W_stacked·A_stackedᵀ [N, S·r] (row block j uses its
    column block j: one GEMM over the stacked weights), lora_A [S·r, K] and lora_B [N, r] the
    stacked A's and B's, weight_sq and magnitude [N]. Returns the layers' (col_scale, inv_norm)
    concatenated: what dora_scale gives them one by one (the same kernel arithmetic; A·Aᵀ is one
    GEMM over the stacked A's, whose blocking may round differently from S small ones)."""
    if wa.dtype in NATIVE_DTYPES:
        _select_gram_kernel(wa)
        return torch.ops.qlora_ext.dora_scale_stacked(wa, lora_A, lora_B, weight_sq, magnitude, list(rows),
                                                      [float(s) for s in scales])  # fmt: skip
    return dora_scale_stacked_reference(wa, lora_A, lora_B, weight_sq, magnitude, rows, scales)


def dora_scale_backward(dy: Tensor, z: Tensor, col_scale: Tensor, inv_norm: Tensor) -> tuple[Tensor, Tensor]:
    """(dz = dy ⊙ col_scale [..., N], dm = inv_norm ⊙ Σ_rows dy ⊙ z fp32 [N]): one pass over dy and
    z on the native path."""
    if dy.dtype in NATIVE_DTYPES:
        return torch.ops.qlora_ext.dora_scale_backward(dy, z, col_scale, inv_norm)
    return dora_scale_backward_reference(dy, z, col_scale, inv_norm)


#: Device types where dora_output takes the native column-scale kernel (qlora_ext::dora_column_scale,
#: 16-byte accesses) instead of PyTorch's broadcasting multiply, which ran its generic strided
#: kernel on the H100: 19.7 ms of a 272 ms 8B QDoRA step (513 launches;
#: benchmarks/results/lora_family_dora_profile_8b_h100.txt). Alone on the H100 (2048 tokens, bf16,
#: bench_dora_kernels.py, dora_kernels_h100.json): 15.6 vs 25.4 µs at N = 4096, 53.8 vs 78.5 µs
#: at N = 14336, but 11.6 vs 9.4 µs at N = 1024 (COLUMN_SCALE_MIN_COLUMNS). Without a bias both
#: give the same bits. On the CPU both take the same time (2 cores).
COLUMN_SCALE_DEVICES: tuple[str, ...] = ("cpu", "cuda")
#: Per device type, the fewest output columns for which dora_output takes the native kernel (the
#: k/v projections of an 8B, N = 1024, keep PyTorch's multiply on CUDA); absent: any.
COLUMN_SCALE_MIN_COLUMNS: dict[str, int] = {"cuda": 4096}
#: Device types where wa = W·Aᵀ comes from the NF4 codes by nf4_gemv (A's r <= 16 rows as the
#: GEMV's batch: W read at ~0.56 bytes a weight) instead of a GEMM over the bf16 W that the base
#: GEMM dequantized (2 bytes a weight, no longer in L2 by then). The H100 GEMV at 16 rows: 11.8 vs
#: 16.4 µs for cuBLAS at [4096, 4096], 28.6 vs 42.2 at [14336, 4096], 31.1 vs 45.1 at [4096, 14336]
#: (nf4_gemv_variants_h100.json); by those, ~1.8 ms of an 8B step at 2048 tokens. Measured end to
#: end (H100 2026-12-06, bench_lora_family --kernel-time, lora_family_dora_norm_from_codes_*): the
#: summed kernel time of a QDoRA step went 258.1 -> 256.5 ms at 8B but 62.4 -> 63.0 ms at 1B, and
#: the host was too noisy that run for step times: off until a quiet run shows it pays. Its CUDA
#: tests passed there.
NORM_FROM_CODES_DEVICES: tuple[str, ...] = ()


def dora_column_scale_reference(z: Tensor, col_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """qlora_ext::dora_column_scale in plain PyTorch: y = z ⊙ c (+ bias) with the product rounded
    to fp32 (fp64 for fp64 z) before the bias is added, then rounded once to z's dtype."""
    dt = torch.promote_types(z.dtype, torch.float32)
    y = z.to(dt) * col_scale.to(dt)
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(z.dtype)


def dora_column_scale(z: Tensor, col_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = z ⊙ col_scale (+ bias) [..., N], all of z's dtype: one pass on the native path."""
    if z.dtype in NATIVE_DTYPES:
        return _ops.past_autograd(torch.ops.qlora_ext.dora_column_scale, z, col_scale, bias)
    return dora_column_scale_reference(z, col_scale, bias)


def _dora_column_scale_setup(ctx, inputs, output) -> None:
    z, col_scale, bias = inputs
    ctx.save_for_backward(z if ctx.needs_input_grad[1] else None, col_scale)
    ctx.has_bias = bias is not None


def _dora_column_scale_backward(ctx, dy):
    z, col_scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    rows, n = math.prod(dy.shape[:-1]), dy.shape[-1]
    acc = torch.promote_types(dy.dtype, torch.float32)
    dz = torch.mul(dy, col_scale) if need[0] else None
    dc = (dy.to(acc) * z.to(acc)).reshape(rows, n).sum(0).to(col_scale.dtype) if need[1] else None
    dbias = dy.to(acc).reshape(rows, n).sum(0).to(dy.dtype) if ctx.has_bias and need[2] else None
    return dz, dc, dbias


def swiglu_scaled_dora_backward_reference(dh: Tensor, gate: Tensor, up: Tensor, gate_scale: Tensor, up_scale: Tensor,
                                          gate_inv_norm: Tensor, up_inv_norm: Tensor) -> tuple[Tensor, ...]:  # fmt: skip
    """qlora_ext::swiglu_scaled_dora_backward in plain PyTorch: the SwiGLU's gradients for its
    operands g = c_g ⊙ z_g and u = c_u ⊙ z_u (rounded to the dtype, as the native op holds them),
    then dora_scale_backward_reference of each -> (dz_gate, dz_up, dm_gate, dm_up)."""
    dg, du = reference.swiglu_scaled_backward(dh, gate, up, gate_scale, up_scale)
    dz_gate, dm_gate = dora_scale_backward_reference(dg.to(gate.dtype), gate, gate_scale, gate_inv_norm)
    dz_up, dm_up = dora_scale_backward_reference(du.to(up.dtype), up, up_scale, up_inv_norm)
    return dz_gate, dz_up, dm_gate, dm_up


def swiglu_scaled_dora_backward(dh: Tensor, gate: Tensor, up: Tensor, gate_scale: Tensor, up_scale: Tensor,
                                gate_inv_norm: Tensor, up_inv_norm: Tensor) -> tuple[Tensor, ...]:  # fmt: skip
    """DoRA's gate and up backward through the MLP's SwiGLU of c_g ⊙ z_g and c_u ⊙ z_u (gate, up:
    the projections' z [..., I]; the scales c [I]; the inverse norms fp32 [I]) -> (dz_gate, dz_up,
    dm_gate, dm_up): block_ops' swiglu_scaled_backward then dora_scale_backward of each gradient,
    with their bits, in one CUDA pass (the two gradients never stored)."""
    if dh.dtype in NATIVE_DTYPES:
        return torch.ops.qlora_ext.swiglu_scaled_dora_backward(dh, gate, up, gate_scale, up_scale, gate_inv_norm,
                                                               up_inv_norm)  # fmt: skip
    return swiglu_scaled_dora_backward_reference(dh, gate, up, gate_scale, up_scale, gate_inv_norm, up_inv_norm)


def _register_native_fakes() -> None:
    try:
        native()
    except ImportError:
        return  # the package imports without _C; the operators say what to do on first use

    @torch.library.register_fake("qlora_ext::dora_column_scale")
    def _(z, col_scale, bias=None):
        torch._check(z.dim() >= 1, lambda: "z must be [..., N]")
        n = z.shape[-1]
        torch._check(tuple(col_scale.shape) == (n,) and col_scale.dtype == z.dtype,
                     lambda: f"col_scale must be [{n}] of z's dtype")  # fmt: skip
        torch._check(bias is None or (tuple(bias.shape) == (n,) and bias.dtype == z.dtype),
                     lambda: f"bias must be [{n}] of z's dtype")  # fmt: skip
        return z.new_empty(z.shape)

    torch.library.register_autograd("qlora_ext::dora_column_scale", _dora_column_scale_backward,
                                    setup_context=_dora_column_scale_setup)  # fmt: skip

    @torch.library.register_fake("qlora_ext::dora_scale")
    def _(wa, lora_A, lora_B, weight_sq, magnitude, scale):
        torch._check(wa.dim() == 2, lambda: f"wa must be [N, r], got {tuple(wa.shape)}")
        n, r = wa.shape
        torch._check(lora_A.dim() == 2 and lora_A.shape[0] == r, lambda: f"lora_A must be [{r}, K]")
        torch._check(tuple(lora_B.shape) == (n, r), lambda: f"lora_B must be [{n}, {r}]")
        torch._check(tuple(weight_sq.shape) == (n,) and weight_sq.dtype == torch.float32,
                     lambda: f"weight_sq must be float32 [{n}]")  # fmt: skip
        torch._check(tuple(magnitude.shape) == (n,), lambda: f"magnitude must be [{n}]")
        return wa.new_empty((n,)), wa.new_empty((n,), dtype=torch.float32)

    @torch.library.register_fake("qlora_ext::dora_scale_stacked")
    def _(wa, lora_A, lora_B, weight_sq, magnitude, rows, scales):
        layers = len(rows)
        torch._check(1 <= layers <= 4 and len(scales) == layers,
                     lambda: f"rows and scales must list the same 1 to 4 layers, got {len(rows)} and {len(scales)}")  # fmt: skip
        torch._check(wa.dim() == 2 and wa.shape[1] % layers == 0, lambda: f"wa must be [N, S·r], got {tuple(wa.shape)}")
        n, r = wa.shape[0], wa.shape[1] // layers
        torch._check(sum(rows) == n, lambda: f"rows must sum to wa's N = {n}")
        torch._check(lora_A.dim() == 2 and lora_A.shape[0] == layers * r, lambda: f"lora_A must be [{layers * r}, K]")
        torch._check(tuple(lora_B.shape) == (n, r), lambda: f"lora_B must be [{n}, {r}]")
        torch._check(tuple(weight_sq.shape) == (n,) and weight_sq.dtype == torch.float32,
                     lambda: f"weight_sq must be float32 [{n}]")  # fmt: skip
        torch._check(tuple(magnitude.shape) == (n,), lambda: f"magnitude must be [{n}]")
        return wa.new_empty((n,)), wa.new_empty((n,), dtype=torch.float32)

    @torch.library.register_fake("qlora_ext::dora_scale_backward")
    def _(dy, z, col_scale, inv_norm):
        torch._check(dy.dim() >= 1, lambda: "dy must be [..., N]")
        n = dy.shape[-1]
        torch._check(z.shape == dy.shape and z.dtype == dy.dtype, lambda: "z must have dy's shape and dtype")
        torch._check(tuple(col_scale.shape) == (n,) and col_scale.dtype == dy.dtype,
                     lambda: f"col_scale must be [{n}] of dy's dtype")  # fmt: skip
        torch._check(tuple(inv_norm.shape) == (n,) and inv_norm.dtype == torch.float32,
                     lambda: f"inv_norm must be float32 [{n}]")  # fmt: skip
        return dy.new_empty(dy.shape), dy.new_empty((n,), dtype=torch.float32)

    @torch.library.register_fake("qlora_ext::swiglu_scaled_dora_backward")
    def _(dh, gate, up, gate_scale, up_scale, gate_inv_norm, up_inv_norm):
        torch._check(gate.dim() >= 1 and gate.shape[-1] >= 1, lambda: "gate must be [..., I] with I >= 1")
        n = gate.shape[-1]
        for t, name in ((dh, "dh"), (up, "up")):
            torch._check(t.shape == gate.shape and t.dtype == gate.dtype, lambda: f"{name} must have gate's shape and dtype")
        for t, name in ((gate_scale, "gate_scale"), (up_scale, "up_scale")):
            torch._check(tuple(t.shape) == (n,) and t.dtype == gate.dtype, lambda: f"{name} must be [{n}] of gate's dtype")
        for t, name in ((gate_inv_norm, "gate_inv_norm"), (up_inv_norm, "up_inv_norm")):
            torch._check(tuple(t.shape) == (n,) and t.dtype == torch.float32, lambda: f"{name} must be float32 [{n}]")
        return (gate.new_empty(gate.shape), gate.new_empty(gate.shape), gate.new_empty((n,), dtype=torch.float32),
                gate.new_empty((n,), dtype=torch.float32))  # fmt: skip


_register_native_fakes()

# ---- qlora_ext::nf4_dora_linear ----------------------------------------------------------------
# Arguments 0-14 are nf4_lora_linear's, in its order, so that LoRA's backward can be reused with
# the same needs_input_grad positions; the magnitude and the cached ‖W‖² follow.


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
    bias: Optional[Tensor],  # [N], added after the scaling
    lora_A: Tensor,  # [r, K]
    lora_B: Tensor,  # [N, r]
    scale: float,
    magnitude: Tensor,  # m [N]
    weight_sq: Tensor,  # ‖deq(W)_i‖² [N] (fp32), constant
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # y [..., N]; z [..., N]; xa [..., r]; 1/n [N] fp32 (fp64 for fp64 x); c = m/n [N] (x's dtype)
    return dora_project(x, x_lora, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                        nested_blocksize, weight_shape, weight_dtype, bias, lora_A, lora_B, scale, magnitude,
                        weight_sq)  # fmt: skip


def weight_times_a(w: Tensor, a: Tensor, weight_args) -> Tensor:
    """wa = deq(W)·Aᵀ [N, r], the norm's input: from `w`, the dequantized W the base GEMM used, or
    on NORM_FROM_CODES_DEVICES (r <= 16) by nf4_gemv from the codes in `weight_args` (packed,
    absmax, nested absmax/code/offset, blocksize, nested blocksize, weight shape) as the transpose
    of A·Wᵀ [r, N] (dora_scale makes it contiguous)."""
    if w.device.type in NORM_FROM_CODES_DEVICES and a.dtype in NATIVE_DTYPES and a.shape[0] <= _ops.NF4_GEMV_MAX_ROWS:
        packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape = weight_args
        return _ops.nf4_gemv(a, packed, absmax, blocksize, shape, None, nested_absmax, nested_code, nested_offset,
                             nested_blocksize).t()  # fmt: skip
    return F.linear(w, a)


def dora_project(x, x_lora, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                 weight_shape, weight_dtype, bias, lora_A, lora_B, scale, magnitude, weight_sq,
                 norm: tuple[Tensor, Tensor] | None = None, output: bool = True):  # fmt: skip
    """The body of nf4_dora_linear (its outputs: y, z, xa, 1/n, c). `norm` = (1/n, c) of an
    earlier call with the same parameters (a checkpointed layer's recomputation, see
    checkpointing.remember / replayed) skips W·Aᵀ and the norm kernel; the outputs are the same bits.
    output=False: y is None, for a consumer that takes z and c (fused_mlp's swiglu_scaled)."""
    dtype = x.dtype
    xl = x if x_lora is None else x_lora
    w = _dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                    nested_blocksize, weight_shape, weight_dtype, dtype)  # fmt: skip
    a = lora_A.to(dtype)
    z = F.linear(x, w)
    wa = None
    if norm is None:
        wa = weight_times_a(w, a, (packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                   nested_blocksize, weight_shape))  # fmt: skip
    del w
    xa = F.linear(xl, a)  # [..., r]
    rows, n_out = math.prod(x.shape[:-1]), weight_shape[0]
    z.view(rows, n_out).addmm_(xa.reshape(rows, a.shape[0]), lora_B.to(dtype).t(), alpha=scale)
    if norm is None:
        # c rounded to x's dtype once, used by forward and backward alike (as autograd would)
        c, inv_norm = dora_scale(wa, lora_A, lora_B, weight_sq, magnitude, scale)
    else:
        inv_norm, c = norm
    return (dora_output(z, c, bias) if output else None), z, xa, inv_norm, c


def dora_output(z: Tensor, c: Tensor, bias: Tensor | None) -> Tensor:
    """y = z ⊙ c (+ bias) in z's dtype: one kernel. The fused MLP recomputes its gate and up
    outputs from z with this very function, so they equal the forward's bit for bit."""
    device = z.device.type
    if device in COLUMN_SCALE_DEVICES and z.shape[-1] >= COLUMN_SCALE_MIN_COLUMNS.get(device, 0):
        return dora_column_scale(z, c, None if bias is None else bias.to(z.dtype))
    return torch.mul(z, c) if bias is None else torch.addcmul(bias.to(z.dtype), z, c)


_nf4_dora_linear = torch.library.custom_op("qlora_ext::nf4_dora_linear", mutates_args=())(_nf4_dora_linear_impl)


@_nf4_dora_linear.register_fake
def _(x, x_lora, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
      nested_blocksize, weight_shape, weight_dtype, bias, lora_A, lora_B, scale, magnitude, weight_sq):  # fmt: skip
    lead, n_out, r = check_lora_shapes(x, x_lora, weight_shape, lora_A, lora_B)
    torch._check(tuple(magnitude.shape) == (n_out,), lambda: f"magnitude must be [{n_out}], got {tuple(magnitude.shape)}")
    torch._check(tuple(weight_sq.shape) == (n_out,), lambda: f"weight_sq must be [{n_out}], got {tuple(weight_sq.shape)}")
    y = x.new_empty((*lead, n_out))
    norm_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (y, torch.empty_like(y), x.new_empty((*lead, r)), weight_sq.new_empty(n_out, dtype=norm_dtype),
            x.new_empty(n_out))  # fmt: skip


def _nf4_dora_setup(ctx, inputs, output):
    (x, x_lora, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
     shape, wdtype, bias, lora_A, lora_B, scale, magnitude, weight_sq) = inputs  # fmt: skip
    _, z, xa, inv_norm, c = output
    # Only y is differentiable; the rest are returned so that they can be saved. Without
    # materialized grads their (absent) gradients arrive as None, not as zero tensors to add.
    ctx.mark_non_differentiable(z, xa, inv_norm, c)
    ctx.set_materialize_grads(False)
    xl = x if x_lora is None else x_lora
    ctx.save_for_backward(xl, xa, lora_A, lora_B, packed, absmax, nested_absmax, nested_code, nested_offset,
                          z, inv_norm, c)  # fmt: skip
    ctx.x_is_lora_input = x_lora is None
    ctx.quant = (blocksize, nested_blocksize, shape, wdtype)
    ctx.scale = scale
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.magnitude_dtype = magnitude.dtype


class _LoRAGradContext:
    """What _nf4_lora_backward reads from its ctx: LoRA's saved tensors and fields, with the bias
    masked out of needs_input_grad (DoRA's bias gradient is Σ dy, not Σ dz)."""

    def __init__(self, ctx, saved):
        self.saved_tensors = saved[:9]
        self.needs_input_grad = (*ctx.needs_input_grad[:11], False, *ctx.needs_input_grad[12:15])
        self.x_is_lora_input, self.quant, self.scale = ctx.x_is_lora_input, ctx.quant, ctx.scale


def _nf4_dora_backward(ctx, dy, _dz, _dxa, _dinv_norm, _dc):
    need = ctx.needs_input_grad
    if dy is None:  # y did not reach the loss
        return (None,) * 17
    z, inv_norm, c = ctx.saved_tensors[9:]
    dm = None
    if need[15]:  # dz = dy·c (n constant) and dm = Σ_rows dy ⊙ z / n in one pass
        dz, dm = dora_scale_backward(dy, z, c, inv_norm)
    else:
        dz = dy * c
    grads = nf4_dora_backward_from_dz(ctx, dz, dm)
    if need[11]:
        grads[11] = dy.sum(list(range(dy.dim() - 1))).to(ctx.bias_dtype)
    return tuple(grads)


def nf4_dora_backward_from_dz(ctx, dz: Tensor, dm: Tensor | None) -> list:
    """nf4_dora_linear's 17 gradients from dz = dy ⊙ c and dm = Σ_rows dy ⊙ z / n (fp32; None
    where m needs no gradient) that the caller has computed — the fused MLP takes both from
    swiglu_scaled_dora_backward. The bias's gradient (Σ dy) is left None: dy is the caller's."""
    if dm is not None and dm.dtype != ctx.magnitude_dtype:  # a no-op .to() still costs a dispatch
        dm = dm.to(ctx.magnitude_dtype)
    grads = list(_nf4_lora_backward(_LoRAGradContext(ctx, ctx.saved_tensors), dz, None))
    return [*grads, dm if ctx.needs_input_grad[15] else None, None]


_nf4_dora_linear.register_autograd(_nf4_dora_backward, setup_context=_nf4_dora_setup)
_EagerNF4DoRALinear = eager_twin("_EagerNF4DoRALinear", _nf4_dora_linear_impl, _nf4_dora_setup, _nf4_dora_backward)
# The same with an 18th input, norm = (1/n, c) of the first forward, for a checkpointed layer's
# recomputation (eager only: torch.compile takes the operator, which computes the norm).
_EagerNF4DoRALinearNormed = eager_twin(
    "_EagerNF4DoRALinearNormed",
    lambda *inputs: dora_project(*inputs[:17], norm=inputs[17]),
    lambda ctx, inputs, output: _nf4_dora_setup(ctx, inputs[:17], output),
    lambda ctx, *grads: (*_nf4_dora_backward(ctx, *grads), None),
)


def nf4_dora_linear(
    x: Tensor,
    weight: NF4Weight,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_sq: Tensor,
    scale: float,
    x_lora: Tensor | None = None,
) -> Tensor:
    """DoRA's y [..., N] = m/n ⊙ (x·deq(W)ᵀ + scale·(x_lora·Aᵀ)·Bᵀ) (+ bias), n = ‖deq(W) + s·BA‖_row
    detached, from weight_sq = ‖deq(W)‖²_row [N] (fp32; DoRAAdapter.weight_sq_norm caches it).
    Differentiable in x, x_lora, bias, A, B and magnitude m [N]; never in W."""
    check_lora_args(x, weight, lora_A, lora_B, x_lora)
    n_out = weight.shape[0]
    if magnitude.shape != (n_out,) or weight_sq.shape != (n_out,):
        raise ValueError(f"magnitude and weight_sq must be [{n_out}], got {tuple(magnitude.shape)}, {tuple(weight_sq.shape)}")
    args = (x, x_lora, *_weight_args(weight), bias, lora_A, lora_B, float(scale), magnitude, weight_sq)
    if use_operators():
        return torch.ops.qlora_ext.nf4_dora_linear(*args)[0]
    # The norm depends only on the parameters: a checkpointed layer's recomputation reuses the one
    # its first forward computed (checkpointing.remember/replayed), skipping W·Aᵀ and the norm
    # kernel; the result is the same bits.
    key = ("qlora_ext.dora", id(weight.packed), id(magnitude))
    norm = checkpointing.replayed(key)
    if norm is not None and norm[1].dtype == x.dtype and norm[1].device == x.device:
        return _EagerNF4DoRALinearNormed.apply(*args, norm)[0]
    y, _, _, inv_norm, c = _EagerNF4DoRALinear.apply(*args)
    checkpointing.remember(key, (inv_norm, c))
    return y


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

    def weight_norm(self, layer) -> Tensor:
        """n = ‖deq(W) + s·BA‖_row [out] (fp32, no grad) by the forward's formula (wa from one
        transient deq(W), nothing else [out, in]); for inspection, the forward computes its own."""
        with torch.no_grad():
            a = self.lora_A.weight.float()
            wa = F.linear(layer.weight.dequantize().float(), a)
            n_sq = _row_norm_sq(wa, a, self.lora_B.weight.float(), self.weight_sq_norm(layer), self.scale)
            return n_sq.clamp_min_(0).sqrt_()

    # ---- forward ------------------------------------------------------------------------------

    def forward_with_base(self, layer, x: Tensor) -> Tensor:
        x_lora = self.dropout(x) if self.training and self.dropout_p > 0 else None
        return nf4_dora_linear(x, layer.weight, layer.bias, self.lora_A.weight, self.lora_B.weight,
                               self.lora_magnitude_vector, self.weight_sq_norm(layer), self.scale, x_lora)  # fmt: skip

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
