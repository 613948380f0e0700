"""Fused RMSNorm, RoPE and SwiGLU (block_ops.py) wired into Llama-family models, per instance.

    n = qlora_ext.enable_fused_block_ops(model)     # prepare() calls it (fused_block_ops=True)

For transformers' Llama, Mistral, Qwen2 and Qwen3 models and qlora_ext's builtin TinyLlama, each
RMSNorm module, each SwiGLU MLP, each attention module and (transformers) each decoder layer gets
an instance-level forward (or, for TinyLlama's attention, an instance-level `rotate`) that calls
the fused operators; no class and no module global is touched, so other models in the process are
unaffected and `disable_fused_block_ops` restores the originals by deleting the instance attributes.

The instance forwards use the fused operators only for inputs on the devices given (by default
FUSED_DEVICES, where they measured faster than PyTorch's composite) and call the class's forward
otherwise, so a model can move between devices freely.

transformers' modules are matched by the statements of their class's forward (parsed with `ast`):
the fused forwards reproduce those statements with the fused operators in place of the composite
ones, so a transformers version whose forward differs in any statement keeps its own forward, and
the reason is logged once per class (logger "qlora_ext").

Decoding (one query token, no gradient) takes four more shortcuts, each with a switch:
- the attention writes a transformers StaticCache layer with block_ops.rope_append_kv_ (the rope
  of q and k and the cache write in one launch, the filled length read and advanced on the
  device) instead of rope_ + StaticLayer.update (ROPE_APPEND_KV_ENABLED);
- it then attends with block_ops.decode_attention over the filled slots only
  (DECODE_ATTENTION_ENABLED) instead of SDPA over the whole cache: on the CPU (where the fused ops
  are opt-in), and on CUDA once block_ops.set_decode_attention_kernel(True) (its kernels pass
  their tests but measure slower than cuDNN's SDPA, so they are off by default);
- each decoder layer hands its two residual adds to o_proj and down_proj, whose GEMV adds the
  residual in its epilogue at one row (layers.project_add; layers.RESIDUAL_IN_GEMV_ENABLED);
- the MLP's gate/up GEMV applies the SwiGLU in its epilogue (layers.project_swiglu;
  layers.SWIGLU_IN_GEMV_ENABLED).

Numerics: RMSNorm keeps transformers' rounding order (the normalised row is rounded to the input
dtype before the weight multiplies it); RoPE and SwiGLU compute in fp32 and round once, where the
composite rounds after every elementwise op in 16-bit dtypes, so the fused results are at least as
close to fp32 as the originals.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import logging
import math
import sys
import textwrap
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import attention_replay, block_ops, checkpointing
from ._native import native
from .layers import QLoRALinear, project_add, project_swiglu, project_together

logger = logging.getLogger("qlora_ext")

#: Devices whose inputs take the fused operators by default: CUDA only. On the 2-core development
#: machine (one thread, 256 tokens, D 1024, I 2816, 16/4 heads of 64; median ms, fused vs PyTorch's
#: composite) the CPU kernels won only some cases: RMSNorm fwd+bwd 0.95 vs 1.59 (fp32), 1.10 vs
#: 1.26 (bf16); RoPE fwd+bwd 0.84 vs 1.47 (fp32) but 1.69 vs 1.34 (bf16); SwiGLU fwd+bwd 7.5 vs
#: 3.1 (fp32), 9.7 vs 3.0 (bf16): the scalar exp does not vectorise, PyTorch's does. So the CPU
#: keeps the composite path unless asked (devices=("cpu", "cuda")).
FUSED_DEVICES: tuple[str, ...] = ("cuda",)

#: transformers model types whose RMSNorm / MLP / attention modules are candidates.
HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_MARK = "_qlora_fused_block"  # instance attribute naming what was replaced ("forward" or "rotate")


# ---- what transformers' forwards must look like ----------------------------------------------------


def _statements(code: str) -> tuple[str, ...]:
    """The statements of `code`, normalised by ast (formatting and comments do not matter)."""
    return tuple(ast.unparse(s) for s in ast.parse(textwrap.dedent(code)).body)


_RMS_NORM_BODY = _statements("""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
""")

_MLP_BODY = _statements("""
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj
""")

_QK_PLAIN = """
query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
"""
_QK_NORMED = """
query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
"""
_SLIDING_WINDOW = {  # how the attention call passes a sliding window, by family
    None: "",
    "module": "sliding_window=self.sliding_window,",
    "config": 'sliding_window=getattr(self.config, "sliding_window", None),',
}
_ATTENTION_TEMPLATE = """
input_shape = hidden_states.shape[:-1]
hidden_shape = (*input_shape, -1, self.head_dim)
QK
value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
cos, sin = position_embeddings
query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
if CACHE is not None:
    key_states, value_states = CACHE.update(key_states, value_states, self.layer_idx UPDATE_KWARGS)
attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
    self.config._attn_implementation, eager_attention_forward
)
attn_output, attn_weights = attention_interface(
    self, query_states, key_states, value_states, attention_mask,
    dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
    SLIDING_WINDOW **kwargs,
)
attn_output = attn_output.reshape(*input_shape, -1).contiguous()
attn_output = self.o_proj(attn_output)
return attn_output, attn_weights
"""


# transformers' StaticLayer.update (5.x: the filled slots counted on the device in
# `cumulative_length`). Where a StaticLayer's update is exactly this, the fused attention writes
# its keys and values with block_ops.rope_append_kv_ (the rope and this update in one launch).
_STATIC_LAYER_UPDATE = _statements("""
    if not self.is_initialized:
        self.lazy_initialization(key_states, value_states)
    kv_length = key_states.shape[-2]
    cache_position = torch.arange(kv_length, device=self.device) + self.cumulative_length
    self.cumulative_length.add_(kv_length)
    try:
        self.keys.index_copy_(2, cache_position, key_states)
        self.values.index_copy_(2, cache_position, value_states)
    except NotImplementedError:
        self.keys[:, :, cache_position] = key_states
        self.values[:, :, cache_position] = value_states
    return (self.keys, self.values)
""")

#: Whether the fused attention writes a transformers StaticCache with rope_append_kv_ (one
#: launch for the rope and the cache write) where it applies; False: rope_ then cache.update.
ROPE_APPEND_KV_ENABLED = True

# How the KV cache reaches the attention, by transformers version: (argument name, whether
# cache.update also gets the forward's kwargs). 4.x-5.2x: past_key_values; from ~5.25: cache
# (the old name still accepted by transformers' own forwards through a deprecation shim).
_CACHE_STYLES = (("past_key_values", False), ("cache", True))


def _attention_body(qk: str, sliding_window: str, cache_style: tuple[str, bool]) -> tuple[str, ...]:
    name, update_kwargs = cache_style
    code = (_ATTENTION_TEMPLATE.replace("QK", qk.strip()).replace("SLIDING_WINDOW", sliding_window)
            .replace("CACHE", name).replace("UPDATE_KWARGS", ", kwargs=kwargs" if update_kwargs else ""))  # fmt: skip
    return _statements(code)


_ATTENTION_BODIES = {
    _attention_body(qk, _SLIDING_WINDOW[window], style): (qk is _QK_NORMED, window, style)
    for qk in (_QK_PLAIN, _QK_NORMED)
    for window in _SLIDING_WINDOW
    for style in _CACHE_STYLES
}


# A Llama-family decoder layer's forward (the residual adds around attention and MLP).
_DECODER_LAYER_TEMPLATE = """
residual = hidden_states
hidden_states = self.input_layernorm(hidden_states)
hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
    position_ids=position_ids, CACHE=CACHE, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
hidden_states = residual + hidden_states
residual = hidden_states
hidden_states = self.post_attention_layernorm(hidden_states)
hidden_states = self.mlp(hidden_states)
hidden_states = residual + hidden_states
return hidden_states
"""
_DECODER_LAYER_BODIES = {_statements(_DECODER_LAYER_TEMPLATE.replace("CACHE", name)) for name, _ in _CACHE_STYLES}


@dataclass(frozen=True)
class _AttentionSpec:
    """What a matched transformers attention class does besides RoPE: q/k norms, how it passes a
    sliding window, and its module's attention-function registry and eager fallback."""

    qk_norm: bool
    sliding_window: str | None
    cache_style: tuple[str, bool]  # (the cache argument's name, whether cache.update gets kwargs)
    attention_functions: object
    eager_attention_forward: object
    apply_rotary_pos_emb: object  # the module's composite RoPE (fused_qkv's forward off the fused devices)

    def __deepcopy__(self, memo):
        return self  # immutable; deep-copying a model must not copy transformers' registry


def _forward_body(cls, method: str = "forward") -> tuple[tuple[str, ...], tuple[str, ...]] | str:
    """(parameter names, normalised body statements) of cls.<method>, or why they are unavailable."""
    try:
        source = textwrap.dedent(inspect.getsource(getattr(cls, method)))
    except (OSError, TypeError) as exc:
        return f"its {method}'s source is unavailable ({exc})"
    func = ast.parse(source).body[0]
    if not isinstance(func, ast.FunctionDef):
        return f"its {method} is not a plain function"
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # docstring
    params = tuple(a.arg for a in func.args.args)
    return params, tuple(ast.unparse(s) for s in body)


@functools.cache
def _hf_kind(cls) -> tuple[str, object] | tuple[None, str]:
    """("rms_norm" | "mlp" | "attention", spec) for a transformers class whose forward is one the
    fused forwards reproduce, else (None, the reason)."""
    found = _forward_body(cls)
    if isinstance(found, str):
        return None, found
    params, body = found
    if body == _RMS_NORM_BODY and params == ("self", "hidden_states"):
        return "rms_norm", None
    if body == _MLP_BODY and params == ("self", "x"):
        return "mlp", None
    if body in _DECODER_LAYER_BODIES and params[:4] == ("self", "hidden_states", "attention_mask", "position_ids"):
        return "decoder_layer", None
    if body in _ATTENTION_BODIES and params[:5] == ("self", "hidden_states", "position_embeddings", "attention_mask",
                                                     _ATTENTION_BODIES[body][2][0]):  # fmt: skip
        qk_norm, window, cache_style = _ATTENTION_BODIES[body]
        module = sys.modules.get(cls.__module__)
        registry = getattr(module, "ALL_ATTENTION_FUNCTIONS", None)
        eager = getattr(module, "eager_attention_forward", None)
        rope = getattr(module, "apply_rotary_pos_emb", None)
        if registry is None or eager is None or rope is None or not hasattr(registry, "get_interface"):
            return None, (f"{cls.__module__} has no ALL_ATTENTION_FUNCTIONS.get_interface / eager_attention_forward "
                          "/ apply_rotary_pos_emb")
        return "attention", _AttentionSpec(qk_norm, window, cache_style, registry, eager, rope)
    return None, "its forward differs from the Llama-family structure the fused forwards reproduce"


@functools.cache
def _log_skip_once(cls, reason: str) -> None:
    logger.warning("fused block ops: leaving %s.%s alone: %s", cls.__module__, cls.__qualname__, reason)


# ---- instance forwards ---------------------------------------------------------------------------


def _fused_here(module: nn.Module, x: torch.Tensor) -> bool:
    return x.device.type in module._qlora_fused_devices


def _dead_after_use(projection: nn.Module) -> bool:
    """Whether this projection's output is not kept by its own backward (so SwiGLU's backward may
    overwrite it): nn.Linear and QLoRALinear keep their inputs, never their outputs."""
    return type(projection) in (nn.Linear, QLoRALinear)


def _hf_rms_norm_forward(self, hidden_states):
    if not _fused_here(self, hidden_states):
        return type(self).forward(self, hidden_states)
    return block_ops.rms_norm(hidden_states, self.weight, self.variance_epsilon, cast_before_weight=True)


def _tiny_rms_norm_forward(self, x):
    if not _fused_here(self, x):
        return type(self).forward(self, x)
    return block_ops.rms_norm(x, self.weight, self.eps, cast_before_weight=False)


def _swiglu_mlp_forward(self, x, _qlora_residual=None):
    # (one forward for both families: HF's MLP and TinyLlama's compute down(silu(gate(x)) * up(x)))
    # _qlora_residual: the decoder layer's residual, added to the output (_hf_decoder_layer_forward)
    if not _fused_here(self, x):
        out = type(self).forward(self, x)
        return out if _qlora_residual is None else _qlora_residual + out
    h = project_swiglu(self.gate_proj, self.up_proj, x)  # decoding: one launch, SwiGLU in its epilogue
    if h is None:
        inplace = _dead_after_use(self.gate_proj) and _dead_after_use(self.up_proj)
        together = project_together((self.gate_proj, self.up_proj), x)  # decoding: one GEMV launch for both
        gate, up = together if together is not None else (self.gate_proj(x), self.up_proj(x))
        h = block_ops.swiglu(gate, up, backward_inplace=inplace)
    return self.down_proj(h) if _qlora_residual is None else project_add(self.down_proj, h, _qlora_residual)


def pop_cache(args: tuple, kwargs: dict):
    """(the KV cache, kwargs without it): passed positionally after attention_mask or by either
    name (transformers' deprecation shim accepts both)."""
    cache = args[0] if args else None
    for name in ("past_key_values", "cache"):
        if name in kwargs:
            cache = kwargs.pop(name)
    return cache, kwargs


def _hf_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """transformers' Llama-family attention forward (the statements _hf_kind matched) with the
    fused RoPE; identical otherwise. The cache comes by the name the matched version uses (either
    name is accepted, as transformers' deprecation shim does)."""
    spec = self._qlora_attention_spec
    cache, kwargs = pop_cache(args, kwargs)
    residual = kwargs.pop("_qlora_residual", None)  # the decoder layer's, added to the output
    if (not _fused_here(self, hidden_states) or position_embeddings is None
            or position_embeddings[0].shape[-1] != self.head_dim):  # fmt: skip
        out, weights = type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                          attention_mask=attention_mask, **{spec.cache_style[0]: cache}, **kwargs)  # fmt: skip
        return (out if residual is None else residual + out), weights
    return hf_attention(self, spec, hidden_states, position_embeddings, attention_mask, cache, kwargs,
                        residual=residual)  # fmt: skip


def hf_attention(self, spec: _AttentionSpec, hidden_states, position_embeddings, attention_mask, cache, kwargs,
                 projections=None, fused_rope: bool = True, residual=None):  # fmt: skip
    """The matched attention forward's statements. `projections`: (q, k, v) [..., H·Dh] already
    computed (the fused LoRA Q/K/V unit, fused_qkv.py), else the modules compute them.
    `fused_rope`: block_ops.apply_rope, else the model module's own apply_rotary_pos_emb (the
    class forward's very function, so its bits). `residual`: added to the output (by o_proj's
    GEMV where layers.project_add can)."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    if projections is None:  # decoding an NF4 model: one GEMV launch for the three where it applies
        projections = project_together((self.q_proj, self.k_proj, self.v_proj), hidden_states)
    if projections is None:
        projections = (self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states))
    query, key, value = (p.view(hidden_shape) for p in projections)  # [B, T, H, Dh]
    if spec.qk_norm:
        query, key = self.q_norm(query), self.k_norm(key)
    value = value.transpose(1, 2)
    cos, sin = position_embeddings
    static = _static_cache_layer(cache, self.layer_idx, query, key, value) if fused_rope else None
    if static is not None:  # decoding into a StaticCache: the rope and the cache write in one launch
        query = block_ops.rope_append_kv_(query.transpose(1, 2), key.transpose(1, 2), value, cos, sin,
                                          static.keys, static.values, static.cumulative_length)  # fmt: skip
        key, value = static.keys, static.values
    else:
        if fused_rope and attention_replay.replaying() and checkpointing.projection_outputs_unused():
            # a replayed attention reads neither (the projections skipped them too): gradients only
            query, key = block_ops.rope_gradient_only(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        elif fused_rope:
            # [B, H, T, Dh] views of the fresh projections: rotated in place when no gradient is needed.
            query, key = block_ops.apply_rope(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        else:
            query, key = spec.apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        if cache is not None:
            extra = {"kwargs": kwargs} if spec.cache_style[1] else {}
            key, value = cache.update(key, value, self.layer_idx, **extra)
    output = self.o_proj if residual is None else (lambda x: project_add(self.o_proj, x, residual))
    if static is not None and _decode_attention_applies(self, spec, query, key, attention_mask, kwargs):
        # the filled slots only, read on the device; no mask conversion, no repeat of K/V
        attn_output = block_ops.decode_attention(query, key, value, static.cumulative_length, attention_mask,
                                                 self.scaling)  # fmt: skip
        return output(attn_output.reshape(*input_shape, -1)), None
    if _one_query_grouped_sdpa(self, spec, query, attention_mask, kwargs):
        attn_output = _one_query_grouped_sdpa_forward(self, query, key, value, attention_mask)
        return output(attn_output.reshape(*input_shape, -1)), None
    dropout = 0.0 if not self.training else self.attention_dropout
    if (cache is None and _sliding_window(self, spec) is None and self.config._attn_implementation == "sdpa"
            and getattr(self, "is_causal", True)):  # fmt: skip
        # a checkpointed layer's attention kept for, or replayed in, its recomputation
        attn_output = attention_replay.attention_call(query, key, value, self.scaling, attention_mask, dropout, kwargs,
                                                      record=_replay_keeps_sdpa_priority())  # fmt: skip
        if attn_output is not None:
            return output(attn_output.reshape(*input_shape, -1)), None
    attention = spec.attention_functions.get_interface(self.config._attn_implementation, spec.eager_attention_forward)
    if spec.sliding_window is not None:
        kwargs["sliding_window"] = _sliding_window(self, spec)
    with _sdpa_priority(self, query):
        attn_output, attn_weights = attention(self, query, key, value, attention_mask, dropout=dropout,
                                              scaling=self.scaling, **kwargs)  # fmt: skip
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return output(attn_output), attn_weights


#: PyTorch SDPA backends, in the order to try them, for the fused attention's calls into
#: transformers' "sdpa" attention on CUDA (training, its recomputation, prefill); None keeps
#: PyTorch's own order. The backward runs the kernel family its forward picked.
#: (benchmarks/bench_attention_backends.py times them against each other.)
SDPA_PRIORITY: tuple | None = None


def sdpa_order(first) -> tuple:
    """All four SDPA backends with `first` (a torch.nn.attention.SDPBackend) tried first, the
    others in PyTorch 2.11's order after it: a value for SDPA_PRIORITY that disables none."""
    from torch.nn.attention import SDPBackend

    order = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
    if first not in order:
        raise ValueError(f"first must be one of {[b.name for b in order]}, got {first!r}")
    return (first, *[b for b in order if b != first])


def _replay_keeps_sdpa_priority() -> bool:
    """Whether attention_replay may keep a layer's attention: its `_KeptAttention` runs cuDNN's
    kernels, so not where SDPA_PRIORITY asks for another backend first (the layer's recomputation
    then runs SDPA again, in that order)."""
    if SDPA_PRIORITY is None:
        return True
    from torch.nn.attention import SDPBackend

    return SDPA_PRIORITY[0] == SDPBackend.CUDNN_ATTENTION


def _sdpa_priority(module, query):
    """A context that makes SDPA try SDPA_PRIORITY's backends in order (all four stay enabled when
    it lists all four), or a no-op off CUDA, for other attention implementations, or when unset."""
    if SDPA_PRIORITY is None or not query.is_cuda or module.config._attn_implementation != "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(list(SDPA_PRIORITY), set_priority=True)


@functools.cache
def _is_plain_static_layer(cls) -> bool:
    """Whether `cls` is transformers' StaticLayer with the update rope_append_kv_ reproduces."""
    if cls.__name__ != "StaticLayer" or cls.__module__ != "transformers.cache_utils":
        return False
    found = _forward_body(cls, "update")
    return not isinstance(found, str) and found[1] == _STATIC_LAYER_UPDATE


def _static_cache_layer(cache, layer_idx, query, key, value):
    """The cache layer that block_ops.rope_append_kv_ may write for this call, else None: a
    transformers StaticLayer (exactly, with the expected update) already allocated, on the
    projections' device and dtype, of cache `cache` (no offloading), and a call that needs no
    gradient. query, key, value: [B, T, H, Dh], [B, T, Hk, Dh], [B, Hk, T, Dv]."""
    if not ROPE_APPEND_KV_ENABLED or cache is None or getattr(cache, "offloading", False):
        return None
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(layers):
        return None
    layer = layers[layer_idx]
    if not _is_plain_static_layer(type(layer)) or not getattr(layer, "is_initialized", False):
        return None
    keys, values, length = layer.keys, layer.values, getattr(layer, "cumulative_length", None)
    if not isinstance(length, torch.Tensor) or length.device != key.device:
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    B, T, Hk, Dh = key.shape
    fits = (
        keys.dtype == values.dtype == key.dtype == value.dtype and keys.device == key.device
        and keys.dim() == 4 and tuple(keys.shape) == (B, Hk, keys.shape[2], Dh)
        and tuple(values.shape) == (B, Hk, keys.shape[2], value.shape[-1]) and query.stride(-1) == 1
        and keys.stride(-1) == 1 and values.stride(-1) == 1
    )  # fmt: skip
    return layer if fits else None


#: Whether the fused attention's decode step over a StaticCache written by rope_append_kv_ runs
#: block_ops.decode_attention (its filled slots only, the length read on the device) where it
#: applies; False: SDPA over the whole cache with the mask.
DECODE_ATTENTION_ENABLED = True


def _decode_attention_applies(module, spec, query, keys, attention_mask, kwargs) -> bool:
    """Where block_ops.decode_attention replaces the one-query SDPA call: the conditions of the
    packed-head SDPA below (G may be 1 here), a mask that is None or one row per batch row, and on
    CUDA a case its kernels take (switched on: block_ops.decode_attention_kernel; fp16/bf16, head
    size 64/128/256, <= 16 query heads a K/V head; its ATen fallback is slower than SDPA)."""
    if not DECODE_ATTENTION_ENABLED or getattr(module, "scaling", None) is None:
        return False
    groups = query.shape[1] // keys.shape[1]
    mask_ok = attention_mask is None or (
        attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1
        and attention_mask.shape[-1] >= keys.shape[2]
        and (attention_mask.dtype == torch.bool or attention_mask.dtype in (query.dtype, torch.float32))
    )  # fmt: skip
    kernel = query.device.type != "cuda" or (
        block_ops.decode_attention_kernel()  # (off by default: slower than cuDNN's SDPA, see README)
        and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] in (64, 128, 256) and groups <= 16
    )  # fmt: skip
    return (
        query.shape[2] == 1 and module.config._attn_implementation == "sdpa" and not module.training
        and _sliding_window(module, spec) is None and mask_ok and kernel
        and not any(kwargs.get(k) for k in ("output_attentions", "softcap", "position_bias", "s_aux"))
    )  # fmt: skip


def _sliding_window(module, spec):
    """The sliding window this attention passes to its attention function (None: none), read as
    the matched class reads it (Qwen2 sets it per layer, None on full-attention layers)."""
    if spec.sliding_window == "module":
        return getattr(module, "sliding_window", None)
    if spec.sliding_window == "config":
        return getattr(module.config, "sliding_window", None)
    return None


def _one_query_grouped_sdpa(module, spec, query, attention_mask, kwargs) -> bool:
    """Whether the attention below may run as `_one_query_grouped_sdpa_forward`: one query token
    (decode), grouped K/V heads, transformers' "sdpa" implementation, inference, no sliding window,
    a mask shared by all heads (or none), and no extra attention options."""
    groups = getattr(module, "num_key_value_groups", 1)
    mask_ok = attention_mask is None or (
        attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1
    )  # fmt: skip
    return (
        query.shape[2] == 1 and groups > 1 and module.config._attn_implementation == "sdpa"
        and not module.training and _sliding_window(module, spec) is None and mask_ok
        and not any(kwargs.get(k) for k in ("output_attentions", "softcap", "position_bias", "s_aux"))
    )  # fmt: skip


def _one_query_grouped_sdpa_forward(module, query, key, value, attention_mask):
    """Attention of one query token over grouped K/V heads without repeating K and V: the G query
    heads that share a K/V head become G query rows of it ([B, H, 1, D] -> [B, H/G, G, D]; head h
    reads K/V head h // G, transformers' repeat_kv mapping), and the one-row mask broadcasts over
    them. The same softmax(q·kᵀ·scale)·v per head as transformers' sdpa path; transformers >= 5.2x
    does this itself (its pack_gqa), older versions copy K and V G-fold first (two copies of the
    whole cache per layer and step, and G times the bytes for the attention kernel to read).
    Returns [B, 1, H, D], as transformers' attention functions do."""
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // module.num_key_value_groups, module.num_key_value_groups, dim)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=module.scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2)


def _hf_decoder_layer_forward(self, hidden_states, *args, **kwargs):
    """transformers' Llama-family decoder layer (the statements _hf_kind matched) with the two
    residual adds handed to the attention and the MLP, which do them in o_proj's and down_proj's
    GEMV epilogue where layers.project_add can (one row: decoding at batch 1); two kernels fewer a
    layer. Anything else, or a layer whose attention or MLP is not the fused forward here, takes
    the class's forward."""
    if not args and checkpointing.phase() is not None:  # a checkpointed layer's first forward or recomputation
        kept = attention_replay.decoder_layer_forward(self, hidden_states, **kwargs)
        if kept is not None:
            return kept
    elif not args and _checkpoints_in_class_forward(self):
        return _checkpointed(self, hidden_states, kwargs)
    if args or not _residual_handoff(self, hidden_states):
        return _class_forward(self)(self, hidden_states, *args, **kwargs)
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, _qlora_residual=residual, **kwargs)
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    return self.mlp(hidden_states, _qlora_residual=residual)


def _wraps_checkpointing(forward) -> bool:
    """Whether `forward` is transformers' forward_with_checkpointing: from ~5.25 it wraps a
    GradientCheckpointingLayer's class forward (earlier versions wrapped __call__)."""
    code = getattr(forward, "__code__", None)  # (functools.wraps keeps the wrapped __name__)
    return code is not None and code.co_name == "forward_with_checkpointing" and hasattr(forward, "__wrapped__")


def _class_forward(layer: nn.Module):
    """The class's forward; inside a checkpoint, without transformers' checkpointing wrapper (a
    recomputation with gradients on would otherwise checkpoint the layer once more)."""
    forward = type(layer).forward
    return forward.__wrapped__ if checkpointing.phase() is not None and _wraps_checkpointing(forward) else forward


def _checkpoints_in_class_forward(layer: nn.Module) -> bool:
    """Whether this training call would be checkpointed by qlora_ext's checkpoint inside the class's
    forward (_wraps_checkpointing), which an instance forward such as this file's bypasses unless
    it checkpoints itself."""
    return (_wraps_checkpointing(type(layer).forward) and getattr(layer, "gradient_checkpointing", False)
            and layer.training and torch.is_grad_enabled()
            and checkpointing.is_ours(getattr(layer, "_gradient_checkpointing_func", None)))  # fmt: skip


def _checkpointed(layer: nn.Module, hidden_states, kwargs: dict):
    """This file's decoder layer forward under the layer's checkpoint function, as transformers'
    forward_with_checkpointing runs the class's: no KV cache while checkpointing."""
    kwargs = dict(kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not getattr(layer, "_can_checkpoint_with_cache", False):
        for name in ("cache", "past_key_values", "layer_past"):
            if kwargs.get(name) is not None:
                kwargs[name] = None
    return layer._gradient_checkpointing_func(functools.partial(_hf_decoder_layer_forward, layer, **kwargs),
                                              hidden_states)  # fmt: skip


def _residual_handoff(layer: nn.Module, hidden_states) -> bool:
    """Whether the decoder layer may hand its residual adds to its attention and MLP: one row on a
    fused device, no gradient, and both submodules running this file's fused forwards."""
    return (
        _fused_here(layer, hidden_states) and math.prod(hidden_states.shape[:-1]) == 1
        and not (torch.is_grad_enabled() and hidden_states.requires_grad)
        and _runs(layer.self_attn, _hf_attention_forward) and _runs(layer.mlp, _swiglu_mlp_forward)
    )  # fmt: skip


# The fused LoRA units (fused_qkv.py, fused_mlp.py) own `forward` where they are on and fall back
# to the forward they replaced; both pass the residual through to it.
_UNIT_MODULES = ("qlora_ext.fused_qkv", "qlora_ext.fused_mlp")


def _runs(module: nn.Module, function) -> bool:
    """Whether `module` runs `function` (this file's instance forward), directly or as the
    fallback of a fused LoRA unit."""
    def bound(name):
        return getattr(module.__dict__.get(name), "__func__", None)

    forward = bound("forward")
    if forward is function:
        return True
    return getattr(forward, "__module__", None) in _UNIT_MODULES and bound("_qlora_unfused_forward") is function


def _tiny_rotate(self, q, k, cos, sin):
    if not _fused_here(self, q):
        return type(self).rotate(self, q, k, cos, sin)
    return block_ops.apply_rope(q, k, cos, sin)


# ---- enabling -----------------------------------------------------------------------------------


def _plan(model: nn.Module) -> list[tuple[nn.Module, str, object, object]]:
    """(module, attribute, function, spec) for every module to switch."""
    from .builtin import tiny_llama

    plan = []
    if isinstance(model, tiny_llama.TinyLlama):
        for m in model.modules():
            if isinstance(m, tiny_llama.RMSNorm):
                plan.append((m, "forward", _tiny_rms_norm_forward, None))
            elif isinstance(m, tiny_llama.MLP):
                plan.append((m, "forward", _swiglu_mlp_forward, None))
            elif isinstance(m, tiny_llama.Attention):
                plan.append((m, "rotate", _tiny_rotate, None))
        return plan
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in HF_MODEL_TYPES:
        logger.info("fused block ops: model type %r is not one of %s; nothing switched", model_type, HF_MODEL_TYPES)
        return plan
    for m in model.modules():
        cls = type(m)
        if not cls.__module__.startswith("transformers.models."):
            continue
        name = cls.__name__
        if not name.endswith(("RMSNorm", "MLP", "Attention", "DecoderLayer")):
            continue
        kind, spec = _hf_kind(cls)
        if kind is None:
            _log_skip_once(cls, spec)
        elif kind == "rms_norm":
            plan.append((m, "forward", _hf_rms_norm_forward, None))
        elif kind == "decoder_layer":
            plan.append((m, "forward", _hf_decoder_layer_forward, None))
        elif kind == "mlp":
            act = type(m.act_fn).__name__
            if act in ("SiLU", "SiLUActivation"):
                plan.append((m, "forward", _swiglu_mlp_forward, None))
            else:
                _log_skip_once(cls, f"its activation is {act}, not SiLU")
        else:
            plan.append((m, "forward", _hf_attention_forward, spec))
    return plan


def enable_fused_block_ops(model: nn.Module, devices: Sequence[str] | None = None) -> int:
    """Switch the RMSNorm, SwiGLU-MLP and attention (RoPE) modules of `model` to the fused
    operators, per instance. Returns how many modules this call switched (modules already switched
    are left as they are and not counted).

    devices: device types whose inputs take the fused operators (default FUSED_DEVICES: "cuda");
    inputs elsewhere go through the modules' own forwards. Supported: transformers' Llama, Mistral,
    Qwen2, Qwen3 and the builtin TinyLlama; any other model is left alone (returns 0)."""
    devices = tuple(FUSED_DEVICES if devices is None else devices)
    if not devices:
        return 0
    try:
        native()
    except ImportError as exc:
        logger.warning("fused block ops: not enabled: %s", exc)
        return 0
    switched = 0
    for module, attribute, function, spec in _plan(model):
        if getattr(module, _MARK, None) is not None:
            continue
        # A bound method stored on the instance (not a closure over the module): deepcopy rebinds it.
        # Where the fused LoRA MLP (fused_mlp.py) already owns `forward`, this becomes its fallback.
        target = "_qlora_unfused_forward" if _under_fused_unit(module, attribute) else attribute
        setattr(module, target, types.MethodType(function, module))
        module._qlora_fused_devices = devices
        if spec is not None:
            module._qlora_attention_spec = spec
        setattr(module, _MARK, attribute)
        switched += 1
    return switched


def _under_fused_unit(module: nn.Module, attribute: str) -> bool:
    """Whether `module.forward` is a fused LoRA unit's (the MLP's, fused_mlp.py, or the attention's
    q/k/v, fused_qkv.py), which keeps the forward it replaced as `_qlora_unfused_forward` and
    falls back to it."""
    from .fused_mlp import is_fused_mlp  # (fused_mlp and fused_qkv import this module)
    from .fused_qkv import is_fused_qkv

    if attribute != "forward":
        return False
    return is_fused_mlp(module) or (is_fused_qkv(module) and "_qlora_unfused_forward" in module.__dict__)


def disable_fused_block_ops(model: nn.Module) -> int:
    """Undo enable_fused_block_ops: the classes' own forwards show through again. Returns how many
    modules were restored."""
    restored = 0
    for module in model.modules():
        attribute = getattr(module, _MARK, None)
        if attribute is None:
            continue
        if _under_fused_unit(module, attribute):  # the fused LoRA unit stays; its fallback is the class's
            module._qlora_unfused_forward = types.MethodType(type(module).forward, module)
        else:
            delattr(module, attribute)
        for name in ("_qlora_fused_devices", "_qlora_attention_spec", _MARK):
            module.__dict__.pop(name, None)
        restored += 1
    return restored


def fused_block_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules that use the fused operators."""
    return [n for n, m in model.named_modules() if getattr(m, _MARK, None) is not None]


__all__ = ["enable_fused_block_ops", "disable_fused_block_ops", "fused_block_modules", "FUSED_DEVICES"]
