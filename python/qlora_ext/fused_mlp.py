"""The SwiGLU MLP of a Llama-family decoder layer as one autograd unit, for LoRA or DoRA on an NF4 base.

    g = x·Wgᵀ + s_g·(x·Agᵀ)·Bgᵀ      u = x·Wuᵀ + s_u·(x·Auᵀ)·Buᵀ       [M, I]
    h = silu(g) ⊙ u                                                      [M, I]
    y = h·Wdᵀ + s_d·(h·Adᵀ)·Bdᵀ                                          [M, D]

Module by module (three QLoRA layers, SiLU, a product), autograd keeps for backward x, g, silu(g),
u and h: four [M, I] tensors, where I = 14,336 for Llama-3-8B (56 MiB each at 2,048 tokens in
bf16, 224 MiB at 8,192). This unit keeps x, g and u, plus the thin x·Aᵀ products; h is
recomputed in backward (one elementwise pass) and freed as soon as the down projection's
gradients are formed, and the gradients with respect to g and u are written over g and u
themselves, which are dead by then:

    dh = dy·Wd + s_d·(dy·Bd)·Ad          dAd = s_d·((dy·Bd)ᵀ·h)     dBd = s_d·dyᵀ·(h·Adᵀ)
    σ = sigmoid(g):   du = dh ⊙ silu(g)   dg = dh ⊙ u ⊙ σ ⊙ (1 + g ⊙ (1 − σ))
    dx = dg·Wg + s_g·(dg·Bg)·Ag + du·Wu + s_u·(du·Bu)·Au, and the gate/up adapter gradients.

Each projection's forward and backward are the very functions of the `nf4_lora_linear` operator
(lora_linear.py), so the numbers are those of the module-by-module path; only the order of the
SwiGLU arithmetic differs (fp32 within, rounded to the activation dtype once).

DoRA (dora.py) runs in the same unit: each projection is then `nf4_dora_linear`'s body, z = the
LoRA output above and the projection's output c ⊙ z (+ bias), c = m/n per output row with the
norm n detached; its backward is that operator's (dz = dy ⊙ c and dm = Σ_rows dy ⊙ z / n in one
pass, then LoRA's backward on dz). The unit keeps z_g and z_u (dm needs them) instead of g and u,
and recomputes g = c_g ⊙ z_g (+ bias), u likewise, in backward with the forward's own function
(the same bits): two [M, I] activations kept as for LoRA, where DoRA module by module keeps five
(z_g, g, z_u, u, h). On DORA_SCALED_SWIGLU_DEVICES (no gate/up biases, native kernels) g and u
are never formed: the SwiGLU and its backward read z and c (block_ops.swiglu_scaled, `_GateUp`).
Why a unit at all: training is host-bound on the H100 (8B shapes: QDoRA +11% GPU time but +65%
host time over QLoRA when its MLP ran as three DoRA layers plus SiLU and a product, each an
autograd node with its own small ops); here the MLP costs one node, one Python call chain, and no
separate activation ops. Under checkpointing (qlora_ext.checkpointing) the
recomputation reuses the three weight norms of the first forward (checkpointing.remember /
replayed), skipping W·Aᵀ and the norm kernels; the parameters are the same, so are the bits.

It applies when the three projections are QLoRALinear layers whose active adapters are all plain
LoRA (rsLoRA and LoRA+ included) or all DoRA, without dropout in training, and the activation is
SiLU; otherwise (other variants, a LoRA/DoRA mix), and under torch.compile, the module's own
forward runs. Inference that the fused 4-bit
kernels serve (`_ops.linear_route`: decode and prefill on CUDA, no gradient) also takes the modules:
each projection then reads its packed weight once through nf4_gemv/nf4_gemm, where this unit would
dequantize all three weights for every token (the ~10 ms per token by which LoRA-active decode
trailed merged-adapter decode of an 8B model on the H100, before this rule).

    qlora_ext.fused_mlp.enable_fused_mlp(model)   # prepare(fused_mlp=True) calls it
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ops, block_ops, checkpointing, device_memory
from .adapters import LoRAAdapter
from .dora import (DoRAAdapter, _nf4_dora_backward, _nf4_dora_setup, dora_output, dora_project, nf4_dora_backward_from_dz,
                   swiglu_scaled_dora_backward)
from .fused_blocks import FUSED_DEVICES, HF_MODEL_TYPES
from .layers import QLoRALinear
from .lora_linear import (_autocast_off, _dequantize, _nf4_lora_backward, _nf4_lora_linear_impl, _nf4_lora_setup,
                          _weight_args, keep_low_rank_casts, mm_as, use_operators)

_X, _BIAS, _A, _B, _M = 0, 11, 12, 13, 15  # positions in the operators' inputs (_M: DoRA's magnitude)
_Z, _INV_NORM, _C = 9, 10, 11  # DoRA's saved z, 1/n and c = m/n among its saved tensors (after LoRA's nine)


class _Saved:
    """Stands in for an autograd ctx so that the operators' own setup and backward
    (nf4_lora_linear's, nf4_dora_linear's) serve one projection inside the unit."""

    def __init__(self, needs: tuple[bool, ...]):
        self.needs_input_grad = needs

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors


class _Kind:
    """One adapter kind's projection inside the unit: its operator's body, setup and backward, so
    that each projection computes exactly what the layer alone computes."""

    def __init__(self, name: str, n_inputs: int, grad_positions: tuple[int, ...], has_norm: bool):
        self.name, self.n_inputs, self.grad_positions, self.has_norm = name, n_inputs, grad_positions, has_norm

    def inputs(self, x: Tensor, spec, bias, a: Tensor, b: Tensor, extra) -> tuple:
        """The operator's inputs. `spec` = (weight args, scale); `extra` = DoRA's (m, ‖W‖²)."""
        return (x, None, *spec[0], bias, a, b, spec[1], *extra)

    def needs(self, bias, a: Tensor, b: Tensor, extra) -> tuple[bool, ...]:
        flags = [False] * self.n_inputs
        flags[_X] = True
        flags[_BIAS] = bias is not None and bias.requires_grad
        flags[_A], flags[_B] = a.requires_grad, b.requires_grad
        if self.has_norm:
            flags[_M] = extra[0].requires_grad
        return tuple(flags)


_LORA = _Kind("lora", 15, (_BIAS, _A, _B), has_norm=False)  # nf4_lora_linear: x, x_lora, 9 weight fields, bias, A, B, s
_DORA = _Kind("dora", 17, (_BIAS, _A, _B, _M), has_norm=True)  # nf4_dora_linear: the same, then m, ‖W‖²


def _forward(kind: _Kind, inputs: tuple, norm=None, output: bool = True) -> tuple:
    """The operator's outputs: LoRA (y, xa); DoRA (y, z, xa, 1/n, c), reusing `norm` = (1/n, c);
    y None for DoRA with output=False (its consumer takes z and c: swiglu_scaled)."""
    if kind.has_norm:
        return dora_project(*inputs, norm=norm, output=output)
    return _nf4_lora_linear_impl(*inputs)


def _backward(kind: _Kind, state, dy: Tensor) -> tuple:
    return _nf4_dora_backward(state, dy, None, None, None, None) if kind.has_norm else _nf4_lora_backward(state, dy, None)


def _project(kind: _Kind, x: Tensor, spec, bias, a, b, extra, needs: tuple[bool, ...], norm=None,
             output: bool = True):  # fmt: skip
    """One projection: (the operator's outputs, its backward state)."""
    inputs = kind.inputs(x, spec, bias, a, b, extra)
    state = _Saved(needs)
    out = _forward(kind, inputs if kind.has_norm else keep_low_rank_casts(state, inputs), norm, output)
    (_nf4_dora_setup if kind.has_norm else _nf4_lora_setup)(state, inputs, out)
    return out, state


def _k_extended_applies(kind: _Kind, x: Tensor, specs, ag: Tensor, au: Tensor, scaled: bool) -> bool:
    """Whether the unit forms g and u by the K-extended GEMMs (K_EXTENDED_GATE_UP_DEVICES): LoRA,
    columns aligned, and W dequantized straight to x's dtype having the module path's values: its
    deq(W) in the weight's dtype, then a cast, rounds the same fp32 product once when that dtype
    is x's or fp32 (twice, fp16 then bf16, otherwise)."""
    if kind.has_norm or scaled or x.device.type not in K_EXTENDED_GATE_UP_DEVICES or x.shape[-1] == 0:
        return False
    if any(spec[0][8] not in (x.dtype, torch.float32) for spec in specs[:2]):  # the weights' dtypes
        return False
    per_16_bytes = 16 // x.element_size()
    return x.device.type == "cpu" or (ag.shape[0] % per_16_bytes == 0 and au.shape[0] % per_16_bytes == 0)


def _extended_product(x_ext: Tensor, spec, lora_B: Tensor, bias, low_rank_first: bool) -> Tensor:
    """x_ext·[W | s·B]ᵀ (+ bias), or with [s·B | W] (low_rank_first): W dequantized into its
    columns of the [N, K + r] operand, s·B rounded once from the parameter into the others."""
    weight_args, s = spec
    packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, _ = weight_args
    n, k = shape
    r = lora_B.shape[1]
    w_ext = x_ext.new_empty((n, k + r))
    w_cols, b_cols = (w_ext[:, r:], w_ext[:, :r]) if low_rank_first else (w_ext[:, :k], w_ext[:, k:])
    _ops.nf4_dequantize_into(w_cols, packed, absmax, blocksize, nested_absmax, nested_code, nested_offset,
                             nested_blocksize)  # fmt: skip
    torch.mul(lora_B, s, out=b_cols)
    return F.linear(x_ext, w_ext, None if bias is None else bias.to(x_ext.dtype))


def _project_gate_up_k_extended(x: Tensor, gate_spec, up_spec, gate_bias, up_bias, ag, bg, au, bu, needs_g,
                                needs_u) -> tuple[tuple, tuple]:  # fmt: skip
    """The gate and up projections as _project gives them ((g, xa_g), state), ((u, xa_u), state),
    by K-extended GEMMs (K_EXTENDED_GATE_UP_DEVICES). The states keep x and the xa's as column
    views of the shared [M, rg + K + ru] buffer (x itself is not kept: the same memory)."""
    k, rg, ru = x.shape[-1], ag.shape[0], au.shape[0]
    m = x.numel() // k
    x_ext = x.new_empty((m, rg + k + ru))
    x_mid = x_ext[:, rg : rg + k]
    x_mid.copy_(x.reshape(m, k))
    outs = []
    a_casts = _stacked_casts(ag, au, x.dtype).split((rg, ru))  # (one buffer: the joint backward's [Ag; Au])
    for spec, bias, a, b, needs, xa, low_rank_first, a_cast in (
            (gate_spec, gate_bias, ag, bg, needs_g, x_ext[:, :rg], True, a_casts[0]),
            (up_spec, up_bias, au, bu, needs_u, x_ext[:, rg + k :], False, a_casts[1])):  # fmt: skip
        inputs = _LORA.inputs(x_mid, spec, bias, a, b, ())
        state = _Saved(needs)
        state.low_rank_casts = (a_cast, checkpointing.kept_cast(b, x.dtype))  # for the backward
        torch.mm(x_mid, a_cast.t(), out=xa)
        operand = x_ext[:, : rg + k] if low_rank_first else x_ext[:, rg:]
        y = _extended_product(operand, spec, b, bias, low_rank_first).view(*x.shape[:-1], spec[0][7][0])
        _nf4_lora_setup(state, inputs, (y, xa))
        outs.append(((y, xa), state))
    return outs[0], outs[1]


def _stacked_casts(ag: Tensor, au: Tensor, dtype: torch.dtype) -> Tensor:
    """[Ag; Au] in `dtype`, one tensor (kept by a checkpointed layer for its recomputation)."""
    key = ("qlora_ext.fused_mlp.gate_up_a", id(ag), id(au), ag._version, au._version, dtype)
    return checkpointing.kept_constant(key, lambda: torch.cat((ag, au)).to(dtype), ag, au)


def _stacked(top: Tensor, bottom: Tensor) -> Tensor:
    """[top; bottom]: the tensor they are row blocks of where they are (the K-extended forward's
    casts), else their concatenation."""
    base = top._base
    if (base is not None and base is bottom._base and base.is_contiguous() and base.dim() == 2
            and top.data_ptr() == base.data_ptr() and base.shape[0] == top.shape[0] + bottom.shape[0]
            and bottom.data_ptr() == top.data_ptr() + top.numel() * top.element_size()):  # fmt: skip
        return base
    return torch.cat((top, bottom))


def _norm(out: tuple):
    """(1/n, c) of a DoRA projection's outputs."""
    return out[3], out[4]


def _swiglu(g: Tensor, u: Tensor, native: bool) -> Tensor:
    """h = silu(g) ⊙ u: the fused kernel (block_ops; fp32 math, one rounding) or PyTorch's
    composite; forward and backward's recomputation take the same route, so they agree bit for bit."""
    return block_ops.swiglu(g, u) if native else F.silu(g) * u


def _swiglu_backward_(dh: Tensor, g: Tensor, u: Tensor, native: bool) -> tuple[Tensor, Tensor]:
    """(dg, du) written over (g, u), in fp32 arithmetic rounded once to g's dtype."""
    if native:
        torch.ops.qlora_ext.swiglu_backward_(dh, g, u)
        return g, u
    g32, u32, dh32 = g.float(), u.float(), dh.float()
    sig = torch.sigmoid(g32)
    du = dh32 * g32 * sig
    dg = dh32 * u32 * sig * (1.0 + g32 * (1.0 - sig))
    g.copy_(dg)
    u.copy_(du)
    return g, u


class _GateUp:
    """The SwiGLU's two operands: g and u as tensors, or for DoRA without biases, on the native
    kernels' devices (DORA_SCALED_SWIGLU_DEVICES), as (z, c) pairs that block_ops' swiglu_scaled
    reads directly: c ⊙ z is then never written out and read back (forward, recomputation and
    backward: two [M, I] passes each), with the same bits (the kernel rounds c ⊙ z to the dtype
    first, as dora_output does)."""

    def __init__(self, g: Tensor, u: Tensor, native: bool, scales: tuple[Tensor, Tensor] | None = None):
        self.g, self.u, self.native, self.scales = g, u, native, scales

    def h(self) -> Tensor:
        if self.scales is not None:
            return block_ops.swiglu_scaled(self.g, self.u, *self.scales)
        return _swiglu(self.g, self.u, self.native)

    def backward(self, dh: Tensor) -> tuple[Tensor, Tensor]:
        """(dg, du): the gradients for g and u (the scaled operands), written over g and u where
        those are the operands themselves (dead by then)."""
        if self.scales is not None:
            return torch.ops.qlora_ext.swiglu_scaled_backward(dh, self.g, self.u, *self.scales)
        return _swiglu_backward_(dh, self.g, self.u, self.native)

    def dora_backward(self, dh: Tensor, gate: _Saved, up: _Saved) -> tuple[tuple, tuple] | None:
        """((dz_g, dm_g), (dz_u, dm_u)) for the DoRA gate and up projections' backward (`gate`,
        `up`: their states) in one swiglu_scaled_dora_backward, where the pair is scaled and its
        device in DORA_FUSED_SWIGLU_BACKWARD_DEVICES; None otherwise (backward, then each
        projection's dora_scale_backward)."""
        if self.scales is None or dh.device.type not in DORA_FUSED_SWIGLU_BACKWARD_DEVICES:
            return None
        dz_g, dz_u, dm_g, dm_u = swiglu_scaled_dora_backward(dh, self.g, self.u, *self.scales,
                                                             gate.saved_tensors[_INV_NORM], up.saved_tensors[_INV_NORM])  # fmt: skip
        return (dz_g, dm_g), (dz_u, dm_u)


def _down_z_keeping(x: Tensor, intermediate: int, hidden: int) -> str | None:
    """How a DoRA unit's first forward keeps the down projection's z ([rows, hidden] in x's dtype)
    for the recomputation: "offload" (with the layer's input where that is offloaded), "device"
    (kept on the device), or None (the recomputation computes the projection again)."""
    device_type = x.device.type
    if device_type in DORA_KEEPS_DOWN_Z_DEVICES and intermediate >= DORA_KEEPS_DOWN_Z_MIN_INTERMEDIATE.get(device_type, 0):
        return "offload"
    z_bytes = x.numel() // max(x.shape[-1], 1) * hidden * x.element_size()
    if device_type in DORA_KEEPS_NARROW_DOWN_Z_ON_DEVICE_DEVICES and z_bytes <= DORA_NARROW_DOWN_Z_ON_DEVICE_MAX_BYTES:
        return "device"
    return None


def _scaled_swiglu_applies(kind: _Kind, x: Tensor, native: bool, gate_bias, up_bias) -> bool:
    return (kind.has_norm and native and gate_bias is None and up_bias is None
            and x.device.type in DORA_SCALED_SWIGLU_DEVICES)  # fmt: skip


def _gate_up(scaled: bool, g_out: tuple, u_out: tuple, native: bool) -> _GateUp:
    """The pair from the gate and up projections' outputs (DoRA's: y, z, xa, 1/n, c)."""
    if scaled:
        return _GateUp(g_out[1], u_out[1], native, (g_out[4], u_out[4]))
    return _GateUp(g_out[0], u_out[0], native)


def _down_state(kind: _Kind, h: Tensor, spec, bias, a: Tensor, b: Tensor, extra, needs: tuple[bool, ...],
                z: Tensor | None = None, norm=None) -> _Saved:  # fmt: skip
    """The down projection's backward state for input h, without its forward GEMM (h·Adᵀ, and for
    DoRA the z and (1/n, c) its forward kept, are all the state holds beyond h)."""
    inputs = kind.inputs(h, spec, bias, a, b, extra)
    state = _Saved(needs)
    a_cast = checkpointing.kept_cast(a, h.dtype)
    xa = F.linear(h, a_cast)
    if not kind.has_norm:  # the backward's casts (the first forward's, in a recomputation)
        state.low_rank_casts = (a_cast, checkpointing.kept_cast(b, h.dtype))
    if kind.has_norm:
        _nf4_dora_setup(state, inputs, (None, z, xa, *norm))
    else:
        _nf4_lora_setup(state, inputs, (None, xa))
    return state


#: Device types where a LoRA unit's backward takes the gate and up projections together (see
#: _gate_up_lora_backward): two GEMMs and an add fewer a layer in a host-bound backward.
JOINT_GATE_UP_BACKWARD_DEVICES: tuple[str, ...] = ("cpu", "cuda")


def _joint_gate_up_backward_applies(kind: _Kind, gate: _Saved, up: _Saved, dg: Tensor) -> bool:
    """LoRA projections of one input (no dropout: x is the low-rank input too) with the casts
    their forward kept, in dg's dtype."""
    if kind.has_norm or dg.device.type not in JOINT_GATE_UP_BACKWARD_DEVICES:
        return False
    if not (gate.x_is_lora_input and up.x_is_lora_input):
        return False
    x_g, x_u = gate.saved_tensors[0], up.saved_tensors[0]
    if x_g.shape[-1] == 0:
        return False
    same_x = x_g is x_u or (x_g.data_ptr() == x_u.data_ptr() and x_g.shape == x_u.shape and x_g.stride() == x_u.stride())
    casts = [getattr(st, "low_rank_casts", None) for st in (gate, up)]
    return same_x and all(c is not None and c[0].dtype == dg.dtype for c in casts)


def _gate_up_lora_backward(gate: _Saved, up: _Saved, dg: Tensor, du: Tensor) -> tuple[Tensor, list, list]:
    """The gate and up LoRA projections' backward at once, from their output gradients dg, du
    [.., I]: (dx, gate's and up's gradients after x and x_lora in nf4_lora_linear's order).
    What _nf4_lora_backward computes for each, but with the low-rank paths of both in one GEMM
    each way: the thin gradients g = s·dy·B go into one [M, rg + ru] buffer, so that
    dx = dg·Wg + du·Wu + [g_g | g_u]·[Ag; Au] takes three GEMMs accumulating into one output
    (instead of four and an add) and [dAg; dAu] = [g_g | g_u]ᵀ·x one (instead of two)."""
    xl, xa_g, lora_a_g, lora_b_g, *quant_g = gate.saved_tensors  # (the parameters; the casts below)
    _, xa_u, lora_a_u, lora_b_u, *quant_u = up.saved_tensors
    (a_g, b_g), (a_u, b_u) = gate.low_rank_casts, up.low_rank_casts
    need_g, need_u = gate.needs_input_grad, up.needs_input_grad
    k = xl.shape[-1]
    m = xl.numel() // k
    rg, ru = a_g.shape[0], a_u.shape[0]
    dg2, du2, x2 = dg.reshape(m, dg.shape[-1]), du.reshape(m, du.shape[-1]), xl.reshape(m, k)
    g = dg2.new_empty((m, rg + ru))
    for dy2, b, g_part, s in ((dg2, b_g, g[:, :rg], gate.scale), (du2, b_u, g[:, rg:], up.scale)):
        torch.mm(dy2, b, out=g_part)
        if s != 1:
            g_part.mul_(s)
    dx = None
    if need_g[0] or need_u[0]:
        for dy2, state, quant in ((dg2, gate, quant_g), (du2, up, quant_u)):
            blocksize, nested_blocksize, shape, wdtype = state.quant
            w = _dequantize(*quant, blocksize, nested_blocksize, shape, wdtype, dg.dtype)
            dx = torch.mm(dy2, w) if dx is None else dx.addmm_(dy2, w)
            del w
        dx.addmm_(g, _stacked(a_g, a_u))
        dx = dx.view(*dg.shape[:-1], k)
    rests = []
    d_a = None
    if need_g[12] or need_u[12]:
        if lora_a_g.dtype == lora_a_u.dtype:
            d_a = mm_as(g.t(), x2, lora_a_g.dtype).split((rg, ru))  # rows: contiguous views
        else:
            d_a = (mm_as(g[:, :rg].t(), x2, lora_a_g.dtype), mm_as(g[:, rg:].t(), x2, lora_a_u.dtype))
    for i, (state, dy2, xa, lora_a, lora_b, need) in enumerate(((gate, dg2, xa_g, lora_a_g, lora_b_g, need_g),
                                                               (up, du2, xa_u, lora_a_u, lora_b_u, need_u))):  # fmt: skip
        dbias = dy2.sum(0).to(state.bias_dtype) if need[11] else None
        d_b = mm_as(dy2.t(), xa.reshape(m, lora_a.shape[0]), lora_b.dtype, state.scale) if need[13] else None
        rests.append([None] * 9 + [dbias, d_a[i] if need[12] else None, d_b, None])
    return dx, rests[0], rests[1]


def _rows_backward(kind: _Kind, dy: Tensor, pair: _GateUp, gate: _Saved, up: _Saved, down: _Saved):
    """Backward of the unit over some rows: down's state lacks h, which is recomputed here.
    Returns (dx, grads of (gate bias, up bias, down bias, Ag, Bg, Au, Bu, Ad, Bd[, mg, mu, md])).
    Overwrites the pair's g, u where they are the SwiGLU's operands themselves."""
    h = pair.h()
    down.saved_tensors = (h, *down.saved_tensors[1:])
    dh, _, *down_rest = _backward(kind, down, dy)
    down.saved_tensors = h = None
    fused = pair.dora_backward(dh, gate, up) if kind.has_norm else None
    if fused is not None:  # dz and dm of gate and up straight from dh (no bias: a scaled pair has none)
        pair = dh = None
        (dz_g, dm_g), (dz_u, dm_u) = fused
        dx, _, *gate_rest = nf4_dora_backward_from_dz(gate, dz_g, dm_g)
        del dz_g
        dxu, _, *up_rest = nf4_dora_backward_from_dz(up, dz_u, dm_u)
        dx.add_(dxu)
    else:
        dg, du = pair.backward(dh)
        pair = dh = None
        if _joint_gate_up_backward_applies(kind, gate, up, dg):
            dx, gate_rest, up_rest = _gate_up_lora_backward(gate, up, dg, du)
        else:
            dx, _, *gate_rest = _backward(kind, gate, dg)
            del dg
            dxu, _, *up_rest = _backward(kind, up, du)
            dx.add_(dxu)
    # the backward returns grads for the operator's inputs (x, x_lora, 9 weight fields, bias, A, B,
    # scale[, m, ‖W‖²]); the unit's inputs are the three biases, the three (A, B) pairs, then the
    # three magnitudes (DoRA).
    rests = (gate_rest, up_rest, down_rest)
    grads = [rest[_BIAS - 2] for rest in rests] + [rest[i - 2] for rest in rests for i in (_A, _B)]
    if kind.has_norm:
        grads += [rest[_M - 2] for rest in rests]
    return dx, grads


class _LoRAMLP(torch.autograd.Function):
    """See the module docstring. With `chunk` rows (long sequences), forward keeps only x (and,
    for DoRA, the down projection's z) and backward recomputes gate and up chunk by chunk: the
    [tokens, intermediate] activations then exist for one chunk at a time, at the price of the
    gate and up GEMMs once more.

    `extras` holds per projection what a DoRA projection adds to LoRA's inputs, (m, ‖W‖²), or ()
    for LoRA; the magnitudes are also passed as the trailing tensor inputs so that autograd sees
    them. Every activation kept goes through ctx.save_for_backward (not ctx attributes), so that
    torch.utils.checkpoint's saved-tensor hooks see, drop and recompute them like any other."""

    @staticmethod
    def forward(ctx, x, kind, specs, chunk, native, recompute, extras, gate_bias, up_bias, down_bias, ag, bg, au, bu,
                ad, bd, *mags):  # fmt: skip
        gate_spec, up_spec, down_spec = specs
        ctx.device_type, ctx.kind, ctx.chunk, ctx.native, ctx.done = x.device.type, kind, chunk, native, False
        triples = ((gate_bias, ag, bg), (up_bias, au, bu), (down_bias, ad, bd))
        ctx.needs = [kind.needs(*t, e) for t, e in zip(triples, extras)]
        # The weight norms depend only on the parameters: a checkpointed layer's recomputation
        # reuses its first forward's (W·Aᵀ and the norm kernel skipped; the same bits).
        key = ("qlora_ext.fused_mlp", id(specs[0][0][0]), id(mags[0]) if mags else None)  # gate's codes and m
        norms = (checkpointing.replayed(key) if kind.has_norm else None) or (None, None, None)
        if norms[0] is not None and (norms[0][1].dtype != x.dtype or norms[0][1].device != x.device):
            norms = (None, None, None)
        # DoRA's down projection needs its z in backward (the magnitude's gradient): the first
        # forward keeps it for the recomputation (checkpointing.remember, offloaded with the
        # layer's input where that is), which can then skip the projection as LoRA's does.
        z_key = ("qlora_ext.fused_mlp.z_down", id(down_spec[0][0]), id(mags[2]) if mags else None)
        z_keeping = _down_z_keeping(x, gate_spec[0][7][0], down_spec[0][7][0]) if kind.has_norm else None
        keeps_z = z_keeping is not None
        kept_z = checkpointing.replayed(z_key) if keeps_z and recompute == "skip" else None
        n_down = down_spec[0][7][0]
        if kept_z is not None and (kept_z.dtype != x.dtype or kept_z.device != x.device or norms[2] is None
                                   or kept_z.numel() != x.numel() // max(x.shape[-1], 1) * n_down):  # fmt: skip
            kept_z = None
        if kept_z is not None:  # the first forward may have run whole and this one in chunks, or the reverse
            kept_z = kept_z.reshape(-1, n_down) if chunk is not None else kept_z.reshape(*x.shape[:-1], n_down)
        skip_output = recompute == "skip" and (not kind.has_norm or kept_z is not None)
        scaled = _scaled_swiglu_applies(kind, x, native, gate_bias, up_bias)
        ctx.scaled = scaled
        with _autocast_off(x.device.type):
            if chunk is None:
                if _k_extended_applies(kind, x, specs, ag, au, scaled):
                    (g_out, gate), (u_out, up) = _project_gate_up_k_extended(
                        x, gate_spec, up_spec, gate_bias, up_bias, ag, bg, au, bu, ctx.needs[0], ctx.needs[1])
                else:
                    g_out, gate = _project(kind, x, gate_spec, gate_bias, ag, bg, extras[0], ctx.needs[0], norms[0],
                                           output=not scaled)  # fmt: skip
                    u_out, up = _project(kind, x, up_spec, up_bias, au, bu, extras[1], ctx.needs[1], norms[1],
                                         output=not scaled)  # fmt: skip
                h = _gate_up(scaled, g_out, u_out, native).h()
                if skip_output:
                    down = _down_state(kind, h, down_spec, down_bias, ad, bd, extras[2], ctx.needs[2], kept_z, norms[2])
                    y, down_norm = _unused_output(x, down_spec), norms[2]
                else:
                    y_out, down = _project(kind, h, down_spec, down_bias, ad, bd, extras[2], ctx.needs[2], norms[2])
                    y, down_norm = y_out[0], _norm(y_out) if kind.has_norm else None
                    if keeps_z and recompute == "keep":
                        checkpointing.remember(z_key, y_out[1], offload=z_keeping == "offload")
                # down saved h as its input: dropped, backward recomputes it from g and u.
                down.saved_tensors = (None, *down.saved_tensors[1:])
                if kind.has_norm:
                    # DoRA keeps z_g and z_u (for dm) and recomputes g = c·z (+ bias) from them in
                    # backward: two [M, I] activations kept, as for LoRA, instead of four.
                    ctx.biases = (gate_bias, up_bias)
                    extra = ()
                    checkpointing.remember(key, (_norm(g_out), _norm(u_out), down_norm))
                else:
                    extra = (g_out[0], u_out[0])
                ctx.states = (gate, up, down)
                ctx.layout = [len(st.saved_tensors) for st in ctx.states]
                ctx.save_for_backward(*(t for st in ctx.states for t in st.saved_tensors), *extra)
                for st in ctx.states:
                    st.saved_tensors = None
                return y
            ctx.specs, ctx.extras = specs, extras
            if skip_output:  # backward recomputes the chunks from x (DoRA: and has z, norms): nothing to compute now
                dora = () if kept_z is None else (kept_z, *(t for norm in norms for t in norm))
                ctx.save_for_backward(x, gate_bias, up_bias, down_bias, ag, bg, au, bu, ad, bd, *dora)
                return _unused_output(x, down_spec)
            x2 = x.reshape(-1, x.shape[-1])
            n_out = down_spec[0][7][0]
            y = x.new_empty((x2.shape[0], n_out))
            z_down = x.new_empty((x2.shape[0], n_out)) if kind.has_norm else None
            for begin in range(0, x2.shape[0], chunk):
                rows = x2[begin : begin + chunk]
                g = _forward(kind, kind.inputs(rows, gate_spec, gate_bias, ag, bg, extras[0]), norms[0], not scaled)
                u = _forward(kind, kind.inputs(rows, up_spec, up_bias, au, bu, extras[1]), norms[1], not scaled)
                h = _gate_up(scaled, g, u, native).h()
                out = _forward(kind, kind.inputs(h, down_spec, down_bias, ad, bd, extras[2]), norms[2])
                y[begin : begin + chunk] = out[0]
                if kind.has_norm:  # the first chunk's norms serve the others (same parameters)
                    z_down[begin : begin + chunk] = out[1]
                    norms = (_norm(g), _norm(u), _norm(out))
                del g, u, h, out
            kept = (x, gate_bias, up_bias, down_bias, ag, bg, au, bu, ad, bd)
            if kind.has_norm and norms[0] is not None:
                checkpointing.remember(key, norms)
                if keeps_z and recompute == "keep":
                    checkpointing.remember(z_key, z_down, offload=z_keeping == "offload")
                kept += (z_down, *(t for norm in norms for t in norm))
            ctx.save_for_backward(*kept)
            return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        kind = ctx.kind
        # Only LoRA's whole-piece backward overwrites what it saved (g and u become dg and du);
        # DoRA's recomputes g and u from z, and the chunked one recomputes everything.
        if ctx.done and ctx.chunk is None and not kind.has_norm:
            raise RuntimeError("the fused LoRA MLP's backward ran twice (retain_graph): its saved "
                               "activations were overwritten by the first; disable it with "
                               "qlora_ext.fused_mlp.disable_fused_mlp(model)")
        ctx.done = True
        with _autocast_off(ctx.device_type):
            if ctx.chunk is None:
                saved, at = ctx.saved_tensors, 0
                for st, n in zip(ctx.states, ctx.layout):
                    st.saved_tensors, at = saved[at : at + n], at + n
                gate, up, down = ctx.states
                if ctx.scaled:
                    pair = _GateUp(gate.saved_tensors[_Z], up.saved_tensors[_Z], ctx.native,
                                   (gate.saved_tensors[_C], up.saved_tensors[_C]))  # fmt: skip
                elif kind.has_norm:
                    gate_bias, up_bias = ctx.biases
                    pair = _GateUp(dora_output(gate.saved_tensors[_Z], gate.saved_tensors[_C], gate_bias),
                                   dora_output(up.saved_tensors[_Z], up.saved_tensors[_C], up_bias), ctx.native)  # fmt: skip
                else:
                    pair = _GateUp(*saved[at:], ctx.native)
                del saved
                dx, grads = _rows_backward(kind, dy, pair, gate, up, down)
                for st in ctx.states:  # the activations stay with autograd (retain_graph) or go
                    st.saved_tensors = None
                return dx, None, None, None, None, None, None, *grads
            return (*_chunked_backward(ctx, dy),)


def _chunked_backward(ctx, dy: Tensor):
    kind = ctx.kind
    x, gate_bias, up_bias, down_bias, ag, bg, au, bu, ad, bd, *dora = ctx.saved_tensors
    (gate_spec, up_spec, down_spec), extras = ctx.specs, ctx.extras
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = torch.empty_like(x2)
    total: list[Tensor | None] = [None] * (12 if kind.has_norm else 9)
    if x2.shape[0] == 0:
        return dx.view(x.shape), None, None, None, None, None, None, *total
    z_down, norms = None, (None, None, None)
    if kind.has_norm:
        z_down, norms = dora[0], ((dora[1], dora[2]), (dora[3], dora[4]), (dora[5], dora[6]))
    for begin in range(0, x2.shape[0], ctx.chunk):
        rows = x2[begin : begin + ctx.chunk]
        g, gate = _project(kind, rows, gate_spec, gate_bias, ag, bg, extras[0], ctx.needs[0], norms[0], not ctx.scaled)
        u, up = _project(kind, rows, up_spec, up_bias, au, bu, extras[1], ctx.needs[1], norms[1], not ctx.scaled)
        pair = _gate_up(ctx.scaled, g, u, ctx.native)
        del g, u
        down = _down_state(kind, pair.h(), down_spec, down_bias, ad, bd, extras[2], ctx.needs[2],
                           None if z_down is None else z_down[begin : begin + ctx.chunk], norms[2])  # fmt: skip
        down.saved_tensors = (None, *down.saved_tensors[1:])  # recomputed by _rows_backward
        dx[begin : begin + ctx.chunk], grads = _rows_backward(kind, dy2[begin : begin + ctx.chunk], pair, gate, up,
                                                              down)  # fmt: skip
        del pair
        total = [t if t is None else (t if acc is None else acc.add_(t)) for acc, t in zip(total, grads)]
    return dx.view(x.shape), None, None, None, None, None, None, *total


def _unused_output(x: Tensor, down_spec) -> Tensor:
    """Stands in for the unit's output where nothing reads its values (a recomputation whose
    output only enters the residual add): zeros of the right shape from one element, no GEMM."""
    return x.new_zeros(()).expand(*x.shape[:-1], down_spec[0][7][0])


def _adapter_kind(layer) -> tuple[_Kind, LoRAAdapter] | None:
    """(kind, the layer's active adapter) if the unit can take it: a plain LoRA or a DoRA adapter
    (not a subclass: other variants change the math), no dropout in training, the layer computing
    in its input's dtype."""
    if not isinstance(layer, QLoRALinear) or layer.compute_dtype is not None:
        return None
    adapter = layer.current_adapter()
    kind = _LORA if type(adapter) is LoRAAdapter else _DORA if type(adapter) is DoRAAdapter else None
    if kind is None or (adapter.training and adapter.dropout_p > 0):
        return None
    return kind, adapter


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is F.silu


#: Rows per chunk of the MLP in training: None chooses (see chunk_rows); an int forces it. (DoRA's
#: unit also holds z_g and z_u, ~1.5x LoRA's transient activations; the estimate is LoRA's.)
CHUNK_ROWS: int | None = None
#: Device types where the unit takes DoRA adapters (plain LoRA: every device). On the H100
#: (2026-12-05, bench_lora_family.py, 8B, seq 2048) QDoRA ran at 1.19x QLoRA's step time with it,
#: 1.45x before (module path); its CUDA tests passed there.
DORA_DEVICES: tuple[str, ...] = ("cpu", "cuda")
#: Device types where a DoRA unit (no gate/up biases, native SwiGLU kernels) passes z and c of its
#: gate and up projections to block_ops' swiglu_scaled instead of forming c ⊙ z: per step two
#: [tokens, intermediate] writes and reads fewer in the forward, the recomputation and the
#: backward (~22 GB of traffic by bandwidth), the same bits. H100 (2026-12-06,
#: bench_dora_kernels, [2048, 14336]): forward 65 µs against 167 µs for the column scales and
#: swiglu, backward 100 against 206 µs; end to end (bench_lora_family --interleave, the other
#: defaults on) a QDoRA step took 237.8 ms against 245.8 without it at 8B, 145.2 against 148.5 at 1B.
DORA_SCALED_SWIGLU_DEVICES: tuple[str, ...] = ("cpu", "cuda")
#: Whether a checkpointed layer's recomputation skips what of the unit nobody reads: the down
#: projection's output, where the MLP feeds only the residual add (lora_mlp's recompute). Off only
#: to measure what it saves.
SKIP_UNUSED_RECOMPUTATION = True
#: Device types where a DoRA unit's backward takes its gate and up projections' dz and dm from one
#: swiglu_scaled_dora_backward (dh, z_g, z_u read once; the SwiGLU's two gradients never stored)
#: instead of swiglu_scaled_backward and a dora_scale_backward per projection: the same bits, two
#: operator calls and (CUDA) three launches fewer per layer, and at 8B (2048 tokens) ~350 MB less
#: memory traffic per layer. H100 (2026-12-06): 183.5 against 267.1 µs at [2048, 14336]
#: (bench_dora_kernels.py); QDoRA/QLoRA 1.089 -> 1.076 at 8B, 1.144 -> 1.137 at 1B, peak 1.29 ->
#: 1.27 GiB at 1B (bench_lora_family --interleave, lora_family_dora_session11_{8b,1b}_h100.json);
#: its CUDA tests and the three sanitizers over it passed.
DORA_FUSED_SWIGLU_BACKWARD_DEVICES: tuple[str, ...] = ("cpu", "cuda")
#: Device types where a DoRA unit's first forward keeps the down projection's z [tokens, hidden]
#: for the recomputation, so that it too skips that projection (its GEMM and dequantization: ~11
#: ms of an 8B step at 2048 tokens by the H100 profile). It costs the size of the layer's input
#: again: offloaded with it to pinned host memory where the layer offloads (the default on CUDA),
#: kept on the device otherwise. The GEMM it saves has `intermediate` multiply-adds per element
#: kept, so it pays only for wide MLPs (DORA_KEEPS_DOWN_Z_MIN_INTERMEDIATE).
DORA_KEEPS_DOWN_Z_DEVICES: tuple[str, ...] = ("cpu", "cuda")
#: The narrowest MLP (intermediate width) where a device keeps DoRA's down z. H100 (2026-12-06,
#: bench_lora_family --interleave): at 8B (14,336) a step took 256.5 -> 246.3 ms with z kept; at 1B
#: (8,192) 145.8 -> 148.8 ms (the extra device-to-host copy of [tokens, hidden] costs more than
#: the GEMM it saves).
DORA_KEEPS_DOWN_Z_MIN_INTERMEDIATE: dict[str, int] = {"cuda": 12288}
#: Device types where a DoRA unit narrower than that still keeps the down projection's z, on the
#: device instead (never offloaded: no device-to-host copy, the cost that made keeping it lose at
#: 1B), up to DORA_NARROW_DOWN_Z_ON_DEVICE_MAX_BYTES per layer. The recomputation then skips that
#: projection's dequantization, GEMM and column scale, which counts where the step is host-bound
#: (1B at 2,048 tokens). H100 (2026-12-06, bench_lora_family --interleave,
#: lora_family_dora_candidates_1b_h100.json): 1B QDoRA/QLoRA 1.203 -> 1.193 alone, 1.151 with the stacked
#: Q/K/V norms and the A·Aᵀ kernel; peak 1.16 -> 1.30 GiB (the 22 layers' z, 176 MiB at 2,048
#: tokens). 8B (offloaded z): unchanged.
DORA_KEEPS_NARROW_DOWN_Z_ON_DEVICE_DEVICES: tuple[str, ...] = ("cuda",)
#: The largest down z [tokens, hidden] a layer keeps on the device (above, the recomputation
#: computes the projection again). Keeping z pays where the host bounds the step, which is at few
#: tokens; at many the GEMM it saves is a small part of the step while the memory grows with the
#: tokens (2.75 GiB over a 1B model's 22 layers at 32,768). 16 MiB: a 1B (hidden 2048, bf16) keeps
#: it up to 4,096 tokens.
DORA_NARROW_DOWN_Z_ON_DEVICE_MAX_BYTES = 16 << 20
#: Device types where a LoRA unit forms g and u with their low-rank updates inside the GEMM:
#: g = [x·Agᵀ | x]·[s_g·Bg | Wg]ᵀ and u = [x | x·Auᵀ]·[Wu | s_u·Bu]ᵀ, both operands column views of
#: one [M, rg + K + ru] buffer (x copied in once), W dequantized straight into its columns of the
#: [I, K + r] operand (nf4_dequantize_into by rows). Otherwise x·Wᵀ, then a rank-r addmm_ that
#: reads and writes the [M, I] output once more: 2 × 470 MB of traffic per layer at 8,192 tokens
#: for an 8B model (Llama-3-8B: I = 14,336), in the first forward and again in the recomputation.
#: One rounding instead of two (the update joins the fp32 accumulator). CUDA needs r a multiple of
#: 16 bytes' worth of elements for the aligned columns (r = 8, 16, 32...: else the former way).
#: H100 (2026-12-07, 8B, r 16, same run, train_8b_s19_h100.json): 10,592 against 10,442 tok/s at
#: seq 8192 (+1.4%), 6,653 against 6,570 at 2048; its CUDA tests and memcheck passed.
K_EXTENDED_GATE_UP_DEVICES: tuple[str, ...] = ("cpu", "cuda")
_FEEDS_RESIDUAL = "_qlora_mlp_feeds_residual_only"  # its layer's forward hooks, set by enable_fused_mlp
#: Share of the memory the process may still take (device_memory.available_bytes) that the
#: unit's [rows, intermediate] activations may take before it works chunk by chunk.
ACTIVATION_SHARE = 0.25


def chunk_rows(rows: int, intermediate: int, x: Tensor) -> int | None:
    """None (one piece) unless the unit's activations — g, u, h and dh, [rows, intermediate] each
    — would take more than ACTIVATION_SHARE of the memory this process may still take
    (device_memory.available_bytes: a per-process cap included); then the most rows per chunk that
    fit (at least 1024). CPU: one piece."""
    if CHUNK_ROWS is not None:
        return CHUNK_ROWS if CHUNK_ROWS < rows else None
    need = 4 * rows * intermediate * x.element_size()
    if x.device.type != "cuda" or need < (256 << 20):  # small: not worth asking the driver
        return None
    budget = int(device_memory.available_bytes(x.device) * ACTIVATION_SHARE)
    if need <= budget:
        return None
    return max(1024, budget // (4 * intermediate * x.element_size()))


@functools.cache
def _has_swiglu_kernel(device_type: str) -> bool:
    """Whether this build of the extension has the SwiGLU kernels for the device (a CPU-only build
    used with a CUDA torch has none for CUDA)."""
    key = {"cuda": "CUDA", "cpu": "CPU"}.get(device_type)
    try:
        return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("qlora_ext::swiglu", key)
    except RuntimeError:  # the operator is not registered (no _C)
        return False


def lora_mlp(x: Tensor, gate: QLoRALinear, up: QLoRALinear, down: QLoRALinear,
             fused_devices: tuple[str, ...] = FUSED_DEVICES, recompute: str = "none") -> Tensor | None:
    """down(silu(gate(x)) * up(x)) as one autograd unit, or None where it does not apply (see the
    module docstring); the caller then runs the modules. The SwiGLU inside takes the fused
    kernels (block_ops) for inputs on `fused_devices` (those of fused_block_ops).

    `recompute` = "skip": the caller will read nothing of the output's values, only backpropagate
    through it (a checkpointed layer's recomputation, where the MLP's output only enters the
    residual add). A LoRA unit then skips the down projection's GEMM and its weight's
    dequantization, and returns zeros: backward needs only h·Adᵀ, which it still computes. With
    chunks, whose backward recomputes everything from x, it computes nothing at all. A DoRA unit
    does the same where its first forward, called with "keep", kept the down projection's z
    (DORA_KEEPS_DOWN_Z_DEVICES); otherwise it computes the projection. "none": neither."""
    layers = (gate, up, down)
    found = [_adapter_kind(layer) for layer in layers]
    if any(f is None for f in found) or use_operators() or not x.is_floating_point():
        return None
    kind = found[0][0]
    if any(f[0] is not kind for f in found):  # a LoRA/DoRA mix: rare, the modules take it
        return None
    if kind.has_norm and x.device.type not in DORA_DEVICES:
        return None
    if recompute not in ("none", "keep", "skip"):
        raise ValueError(f"recompute must be 'none', 'keep' or 'skip', got {recompute!r}")
    adapters = [f[1] for f in found]
    factors = [t for a in adapters for t in (a.lora_A.weight, a.lora_B.weight)]
    if _ops.linear_route(x, gate.weight, gate.bias, trainable=factors, caller="lora_mlp") != _ops.ROUTE_DENSE:
        return None  # the modules' fused GEMV/GEMM read each 4-bit weight once; this unit dequantizes
    specs = tuple((_weight_args(layer.weight), float(a.scale)) for layer, a in zip(layers, adapters))
    if kind.has_norm:
        mags = tuple(a.lora_magnitude_vector for a in adapters)
        extras = tuple((m, a.weight_sq_norm(layer)) for m, a, layer in zip(mags, adapters, layers))
    else:
        mags, extras = (), ((), (), ())
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    # Chunked also without grad: checkpointing's first forward is where a long sequence peaks.
    chunk = chunk_rows(rows, gate.weight.shape[0], x)
    native = (x.device.type in fused_devices and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
              and _has_swiglu_kernel(x.device.type))  # fmt: skip
    return _LoRAMLP.apply(x, kind, specs, chunk, native, recompute, extras, gate.bias, up.bias, down.bias, *factors,
                          *mags)  # fmt: skip


def _fused_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    devices = getattr(self, "_qlora_fused_devices", FUSED_DEVICES)  # set where fused_block_ops is on
    recompute = "none"
    if SKIP_UNUSED_RECOMPUTATION and not _output_observed(self):
        recompute = "skip" if checkpointing.recomputing() else "keep" if checkpointing.first_forward() else "none"
    y = lora_mlp(x, self.gate_proj, self.up_proj, self.down_proj, devices, recompute) if not (args or kwargs) else None
    return self._qlora_unfused_forward(x, *args, **kwargs) if y is None else y


def _output_observed(mlp: nn.Module) -> bool:
    """Whether anything may read the MLP's output in a recomputation, which then computes it:
    always, unless enable_fused_mlp found its decoder layer adding it to the residual and nothing
    else; and forward hooks (the MLP's, its layer's — whose output includes it — or global ones)
    must never see the zeros standing in for it."""
    layer_hooks = mlp.__dict__.get(_FEEDS_RESIDUAL)
    return (layer_hooks is None or bool(mlp._forward_hooks or layer_hooks
                                        or nn.modules.module._global_forward_hooks))  # fmt: skip


def _mlp_feeds_residual_only(layer: nn.Module) -> bool:
    """Whether decoder layer `layer` adds its MLP's output to the residual stream and uses it for
    nothing else (no norm after the MLP, as Gemma's post_feedforward_layernorm): the built-in model
    and transformers' Llama-family layers (fused_blocks.HF_MODEL_TYPES)."""
    from .builtin import tiny_llama

    if isinstance(layer, tiny_llama.DecoderLayer):
        return True
    cls = type(layer)
    parts = cls.__module__.split(".")
    return (len(parts) > 2 and parts[:2] == ["transformers", "models"] and parts[2] in HF_MODEL_TYPES
            and cls.__name__.endswith("DecoderLayer")
            and not any("post_feedforward" in name for name, _ in layer.named_children()))  # fmt: skip


def _is_swiglu_mlp(module: nn.Module) -> bool:
    if not all(isinstance(getattr(module, n, None), QLoRALinear) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    act = getattr(module, "act_fn", None)
    if act is not None:
        return _is_silu(act)
    from .builtin.tiny_llama import MLP  # the built-in model calls F.silu directly

    return type(module) is MLP


def enable_fused_mlp(model: nn.Module) -> int:
    """Route every SwiGLU MLP of `model` whose projections are QLoRA layers through `lora_mlp`
    (instance-level forward; the class is untouched). Returns how many MLPs were switched."""
    count = 0
    for module in model.modules():
        if _is_swiglu_mlp(module) and "_qlora_unfused_forward" not in module.__dict__:
            module._qlora_unfused_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    for layer in model.modules():
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, nn.Module) and is_fused_mlp(mlp) and _mlp_feeds_residual_only(layer):
            # the layer's own hook dict (register_forward_hook adds to it in place): the layer
            # itself would become a submodule, a weak reference would not pickle
            mlp.__dict__[_FEEDS_RESIDUAL] = layer._forward_hooks
    return count


def is_fused_mlp(module: nn.Module) -> bool:
    """Whether `module`'s forward is the fused LoRA MLP's (enable_fused_mlp)."""
    return getattr(module.__dict__.get("forward"), "__func__", None) is _fused_forward


def disable_fused_mlp(model: nn.Module) -> None:
    """Undo enable_fused_mlp: each MLP gets back the forward the unit replaced (the class's, or
    fused_block_ops' instance forward)."""
    for module in model.modules():
        if is_fused_mlp(module) and "_qlora_unfused_forward" in module.__dict__:  # (fused_qkv uses the name too)
            module.__dict__.pop(_FEEDS_RESIDUAL, None)
            fallback = module.__dict__.pop("_qlora_unfused_forward")
            if getattr(fallback, "__func__", None) is type(module).forward:
                module.__dict__.pop("forward", None)  # the class's own forward shows through
            else:
                module.forward = fallback
