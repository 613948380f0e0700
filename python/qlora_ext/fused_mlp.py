"""The SwiGLU MLP of a Llama-family decoder layer as one autograd unit, for LoRA on an NF4 base.

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

It applies when the three projections are QLoRALinear layers whose active adapter is a plain
LoRA (rsLoRA and LoRA+ included) without dropout in training, and the activation is SiLU;
otherwise, and under torch.compile, the module's own forward runs.

    qlora_ext.fused_mlp.enable_fused_mlp(model)   # prepare(fused_mlp=True) calls it
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import LoRAAdapter
from .layers import QLoRALinear
from .lora_linear import _autocast_off, _nf4_lora_backward, _nf4_lora_linear_impl, _nf4_lora_setup, _weight_args, use_operators

_N_LORA_INPUTS = 15  # nf4_lora_linear's inputs: x, x_lora, 9 weight fields, bias, A, B, scale
_X, _BIAS, _A, _B = 0, 11, 12, 13


class _Saved:
    """Stands in for an autograd ctx so that nf4_lora_linear's own setup and backward serve one
    projection inside the unit."""

    def __init__(self, needs: tuple[bool, ...]):
        self.needs_input_grad = needs

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors


def _project(x: Tensor, spec, bias, a, b, needs: tuple[bool, ...]):
    """One projection: (y, its backward state)."""
    inputs = (x, None, *spec[0], bias, a, b, spec[1])
    y, xa = _nf4_lora_linear_impl(*inputs)
    state = _Saved(needs)
    _nf4_lora_setup(state, inputs, (y, xa))
    return y, state


def _needs(x: bool, bias, a: Tensor, b: Tensor) -> tuple[bool, ...]:
    flags = [False] * _N_LORA_INPUTS
    flags[_X] = x
    flags[_BIAS] = bias is not None and bias.requires_grad
    flags[_A], flags[_B] = a.requires_grad, b.requires_grad
    return tuple(flags)


def _swiglu_backward_(dh: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """(dg, du) written over (g, u), in fp32 arithmetic rounded once to g's dtype."""
    g32, u32, dh32 = g.float(), u.float(), dh.float()
    sig = torch.sigmoid(g32)
    du = dh32 * g32 * sig
    dg = dh32 * u32 * sig * (1.0 + g32 * (1.0 - sig))
    g.copy_(dg)
    u.copy_(du)
    return g, u


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, specs, gate_bias, up_bias, down_bias, ag, bg, au, bu, ad, bd):
        gate_spec, up_spec, down_spec = specs
        ctx.device_type = x.device.type
        with _autocast_off(x.device.type):
            g, ctx.gate = _project(x, gate_spec, gate_bias, ag, bg, _needs(True, gate_bias, ag, bg))
            u, ctx.up = _project(x, up_spec, up_bias, au, bu, _needs(True, up_bias, au, bu))
            h = F.silu(g) * u
            y, ctx.down = _project(h, down_spec, down_bias, ad, bd, _needs(True, down_bias, ad, bd))
        # The down projection saved h as its input: drop it, backward recomputes it from g and u.
        ctx.down.saved_tensors = (None, *ctx.down.saved_tensors[1:])
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.down is None:
            raise RuntimeError("the fused LoRA MLP's backward ran twice (retain_graph): its saved "
                               "activations were overwritten by the first; disable it with "
                               "qlora_ext.fused_mlp.disable_fused_mlp(model)")
        g, u = ctx.saved_tensors
        with _autocast_off(ctx.device_type):
            h = F.silu(g) * u
            ctx.down.saved_tensors = (h, *ctx.down.saved_tensors[1:])
            dh, _, *down_rest = _nf4_lora_backward(ctx.down, dy, None)
            ctx.down = h = None
            dg, du = _swiglu_backward_(dh, g, u)
            del dh
            dx, _, *gate_rest = _nf4_lora_backward(ctx.gate, dg, None)
            dxu, _, *up_rest = _nf4_lora_backward(ctx.up, du, None)
            dx.add_(dxu)
        ctx.gate = ctx.up = None
        # _nf4_lora_backward returns grads for (x, x_lora, 9 weight fields, bias, A, B, scale).
        pick = lambda rest: (rest[_BIAS - 2], rest[_A - 2], rest[_B - 2])  # noqa: E731
        (gb, dag, dbg), (ub, dau, dbu), (db, dad, dbd) = pick(gate_rest), pick(up_rest), pick(down_rest)
        return dx, None, gb, ub, db, dag, dbg, dau, dbu, dad, dbd


def _plain_lora(layer) -> LoRAAdapter | None:
    """The layer's active adapter if the unit can take it: a plain LoRA, no dropout in training,
    the layer computing in its input's dtype."""
    if not isinstance(layer, QLoRALinear) or layer.compute_dtype is not None:
        return None
    adapter = layer.current_adapter()
    if type(adapter) is not LoRAAdapter or (adapter.training and adapter.dropout_p > 0):
        return None
    return adapter


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is F.silu


def lora_mlp(x: Tensor, gate: QLoRALinear, up: QLoRALinear, down: QLoRALinear) -> Tensor | None:
    """down(silu(gate(x)) * up(x)) as one autograd unit, or None where it does not apply (see the
    module docstring); the caller then runs the modules."""
    adapters = [_plain_lora(layer) for layer in (gate, up, down)]
    if any(a is None for a in adapters) or use_operators() or not x.is_floating_point():
        return None
    specs = tuple((_weight_args(layer.weight), float(a.scale)) for layer, a in zip((gate, up, down), adapters))
    factors = [t for a in adapters for t in (a.lora_A.weight, a.lora_B.weight)]
    return _LoRAMLP.apply(x, specs, gate.bias, up.bias, down.bias, *factors)


def _fused_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    y = lora_mlp(x, self.gate_proj, self.up_proj, self.down_proj) if not (args or kwargs) else None
    return self._qlora_unfused_forward(x, *args, **kwargs) if y is None else y


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
        if _is_swiglu_mlp(module) and not hasattr(module, "_qlora_unfused_forward"):
            module._qlora_unfused_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def disable_fused_mlp(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "_qlora_unfused_forward"):
            module.forward = module._qlora_unfused_forward
            del module._qlora_unfused_forward
