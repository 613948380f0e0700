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
otherwise, and under torch.compile, the module's own forward runs. Inference that the fused 4-bit
kernels serve (`_ops.linear_route`: decode and prefill on CUDA, no gradient) also takes the modules:
each projection then reads its packed weight once through nf4_gemv/nf4_gemm, where this unit would
dequantize all three weights for every token (measured: +10 ms per token on an 8B model).

    qlora_ext.fused_mlp.enable_fused_mlp(model)   # prepare(fused_mlp=True) calls it
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ops
from .adapters import LoRAAdapter
from .fused_blocks import FUSED_DEVICES
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


def _swiglu(g: Tensor, u: Tensor, native: bool) -> Tensor:
    """h = silu(g) ⊙ u: the fused kernel (block_ops; fp32 math, one rounding) or PyTorch's
    composite; forward and backward's recomputation take the same route, so they agree bit for bit."""
    return torch.ops.qlora_ext.swiglu(g, u) if native else F.silu(g) * u


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


def _down_state(h: Tensor, spec, bias, a: Tensor, b: Tensor, needs: tuple[bool, ...]) -> _Saved:
    """The down projection's backward state for input h, without its forward GEMM (h·Adᵀ is all
    the state holds beyond h)."""
    inputs = (h, None, *spec[0], bias, a, b, spec[1])
    state = _Saved(needs)
    _nf4_lora_setup(state, inputs, (None, F.linear(h, a.to(h.dtype))))
    return state


def _rows_backward(dy: Tensor, g: Tensor, u: Tensor, gate: _Saved, up: _Saved, down: _Saved, native: bool):
    """Backward of the unit over some rows: down's state lacks h, which is recomputed here.
    Returns (dx, grads of (gate bias, up bias, down bias, Ag, Bg, Au, Bu, Ad, Bd)). Overwrites g, u."""
    h = _swiglu(g, u, native)
    down.saved_tensors = (h, *down.saved_tensors[1:])
    dh, _, *down_rest = _nf4_lora_backward(down, dy, None)
    down.saved_tensors = h = None
    dg, du = _swiglu_backward_(dh, g, u, native)
    del dh
    dx, _, *gate_rest = _nf4_lora_backward(gate, dg, None)
    dxu, _, *up_rest = _nf4_lora_backward(up, du, None)
    dx.add_(dxu)
    # _nf4_lora_backward returns grads for (x, x_lora, 9 weight fields, bias, A, B, scale); the
    # unit's inputs are the three biases, then the three (A, B) pairs.
    rests = (gate_rest, up_rest, down_rest)
    grads = [rest[_BIAS - 2] for rest in rests] + [rest[i - 2] for rest in rests for i in (_A, _B)]
    return dx, grads


class _LoRAMLP(torch.autograd.Function):
    """See the module docstring. With `chunk` rows (long sequences), forward keeps only x and
    backward recomputes gate and up chunk by chunk: the [tokens, intermediate] activations then
    exist for one chunk at a time, at the price of the gate and up GEMMs once more."""

    @staticmethod
    def forward(ctx, x, specs, chunk, native, gate_bias, up_bias, down_bias, ag, bg, au, bu, ad, bd):
        gate_spec, up_spec, down_spec = specs
        ctx.device_type, ctx.chunk, ctx.native, ctx.done = x.device.type, chunk, native, False
        ctx.needs = [_needs(True, bias, a, b) for bias, a, b in
                     ((gate_bias, ag, bg), (up_bias, au, bu), (down_bias, ad, bd))]  # fmt: skip
        with _autocast_off(x.device.type):
            if chunk is None:
                g, ctx.gate = _project(x, gate_spec, gate_bias, ag, bg, ctx.needs[0])
                u, ctx.up = _project(x, up_spec, up_bias, au, bu, ctx.needs[1])
                h = _swiglu(g, u, native)
                y, ctx.down = _project(h, down_spec, down_bias, ad, bd, ctx.needs[2])
                # down saved h as its input: dropped, backward recomputes it from g and u.
                ctx.down.saved_tensors = (None, *ctx.down.saved_tensors[1:])
                ctx.save_for_backward(g, u)
                return y
            ctx.specs = specs
            ctx.save_for_backward(x, gate_bias, up_bias, down_bias, ag, bg, au, bu, ad, bd)
            x2 = x.reshape(-1, x.shape[-1])
            y = x.new_empty((x2.shape[0], down_spec[0][7][0]))
            for begin in range(0, x2.shape[0], chunk):
                rows = x2[begin : begin + chunk]
                g, _ = _nf4_lora_linear_impl(rows, None, *gate_spec[0], gate_bias, ag, bg, gate_spec[1])
                u, _ = _nf4_lora_linear_impl(rows, None, *up_spec[0], up_bias, au, bu, up_spec[1])
                h = _swiglu(g, u, native)
                del g, u
                y[begin : begin + chunk], _ = _nf4_lora_linear_impl(h, None, *down_spec[0], down_bias, ad, bd, down_spec[1])
            return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if ctx.done:
            raise RuntimeError("the fused LoRA MLP's backward ran twice (retain_graph): its saved "
                               "activations were overwritten by the first; disable it with "
                               "qlora_ext.fused_mlp.disable_fused_mlp(model)")
        ctx.done = True
        with _autocast_off(ctx.device_type):
            if ctx.chunk is None:
                g, u = ctx.saved_tensors
                dx, grads = _rows_backward(dy, g, u, ctx.gate, ctx.up, ctx.down, ctx.native)
                ctx.gate = ctx.up = ctx.down = None
                return dx, None, None, None, *grads
            return (*_chunked_backward(ctx, dy),)


def _chunked_backward(ctx, dy: Tensor):
    x, gate_bias, up_bias, down_bias, ag, bg, au, bu, ad, bd = ctx.saved_tensors
    gate_spec, up_spec, down_spec = ctx.specs
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = torch.empty_like(x2)
    total: list[Tensor | None] = [None] * 9
    for begin in range(0, x2.shape[0], ctx.chunk):
        rows = x2[begin : begin + ctx.chunk]
        g, gate = _project(rows, gate_spec, gate_bias, ag, bg, ctx.needs[0])
        u, up = _project(rows, up_spec, up_bias, au, bu, ctx.needs[1])
        down = _down_state(_swiglu(g, u, ctx.native), down_spec, down_bias, ad, bd, ctx.needs[2])
        down.saved_tensors = (None, *down.saved_tensors[1:])  # recomputed by _rows_backward
        dx[begin : begin + ctx.chunk], grads = _rows_backward(dy2[begin : begin + ctx.chunk], g, u, gate, up, down,
                                                              ctx.native)  # fmt: skip
        total = [t if t is None else (t if acc is None else acc.add_(t)) for acc, t in zip(total, grads)]
    return dx.view(x.shape), None, None, None, *total


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


#: Rows per chunk of the MLP in training: None chooses (see chunk_rows); an int forces it.
CHUNK_ROWS: int | None = None
#: Share of the free device memory that the unit's [rows, intermediate] activations may take
#: before it works chunk by chunk.
ACTIVATION_SHARE = 0.25


def chunk_rows(rows: int, intermediate: int, x: Tensor) -> int | None:
    """None (one piece) unless the unit's activations — g, u, h and dh, [rows, intermediate] each
    — would take more than ACTIVATION_SHARE of the device's free memory; then the most rows per
    chunk that fit (at least 1024). CPU: one piece."""
    if CHUNK_ROWS is not None:
        return CHUNK_ROWS if CHUNK_ROWS < rows else None
    need = 4 * rows * intermediate * x.element_size()
    if x.device.type != "cuda" or need < (256 << 20):  # small: not worth asking the driver
        return None
    free, _ = torch.cuda.mem_get_info(x.device)
    budget = int(free * ACTIVATION_SHARE)
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
             fused_devices: tuple[str, ...] = FUSED_DEVICES) -> Tensor | None:
    """down(silu(gate(x)) * up(x)) as one autograd unit, or None where it does not apply (see the
    module docstring); the caller then runs the modules. The SwiGLU inside takes the fused
    kernels (block_ops) for inputs on `fused_devices` (those of fused_block_ops)."""
    adapters = [_plain_lora(layer) for layer in (gate, up, down)]
    if any(a is None for a in adapters) or use_operators() or not x.is_floating_point():
        return None
    factors = [t for a in adapters for t in (a.lora_A.weight, a.lora_B.weight)]
    if _ops.linear_route(x, gate.weight, gate.bias, trainable=factors, caller="lora_mlp") != _ops.ROUTE_DENSE:
        return None  # the modules' fused GEMV/GEMM read each 4-bit weight once; this unit dequantizes
    specs = tuple((_weight_args(layer.weight), float(a.scale)) for layer, a in zip((gate, up, down), adapters))
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    # Chunked also without grad: checkpointing's first forward is where a long sequence peaks.
    chunk = chunk_rows(rows, gate.weight.shape[0], x)
    native = (x.device.type in fused_devices and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
              and _has_swiglu_kernel(x.device.type))  # fmt: skip
    return _LoRAMLP.apply(x, specs, chunk, native, gate.bias, up.bias, down.bias, *factors)


def _fused_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    devices = getattr(self, "_qlora_fused_devices", FUSED_DEVICES)  # set where fused_block_ops is on
    y = lora_mlp(x, self.gate_proj, self.up_proj, self.down_proj, devices) if not (args or kwargs) else None
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
        if _is_swiglu_mlp(module) and "_qlora_unfused_forward" not in module.__dict__:
            module._qlora_unfused_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def is_fused_mlp(module: nn.Module) -> bool:
    """Whether `module`'s forward is the fused LoRA MLP's (enable_fused_mlp)."""
    return getattr(module.__dict__.get("forward"), "__func__", None) is _fused_forward


def disable_fused_mlp(model: nn.Module) -> None:
    """Undo enable_fused_mlp: each MLP gets back the forward the unit replaced (the class's, or
    fused_block_ops' instance forward)."""
    for module in model.modules():
        if "_qlora_unfused_forward" in module.__dict__:
            fallback = module.__dict__.pop("_qlora_unfused_forward")
            if getattr(fallback, "__func__", None) is type(module).forward:
                module.__dict__.pop("forward", None)  # the class's own forward shows through
            else:
                module.forward = fallback
