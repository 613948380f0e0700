"""A checkpointed decoder layer's attention half, kept instead of recomputed.

Per-layer checkpointing (checkpointing.py) re-runs each layer's forward before its backward. For
the attention half of a Llama-family layer, h = x + o_proj(attention(rope(qkv(norm(x))))), that
recomputation runs the q/k/v and o GEMMs with their dequantizations, RoPE and the attention
forward, only to rebuild what the backward reads: the rotated q, k and v, the attention output
and its log-sum-exp, and h (the MLP half's input). Where the layer inputs are offloaded to pinned
host memory anyway, those few tensors go the same way instead (per layer and token: (Hq + 2·Hk)·Dh
+ Hq·Dh + D values of the model dtype and Hq fp32; for Llama-3-8B 10 KiB a token, 56 MiB a layer at
2048 tokens), and the recomputation replays them:

- the attention runs as `_KeptAttention`, an autograd.Function around PyTorch's own attention
  kernels (cuDNN's on CUDA, the CPU flash kernel on the CPU) with their own backward; in the
  recomputation its forward returns the kept output and keeps the kept q, k, v, output and LSE
  for the backward, without running;
- h comes back through `_ReplayedAdd` (value kept, gradient passed to both addends);
- the projections that feed only replayed values (q/k/v, o) run with
  `checkpointing.outputs_unused()`: the units that honour it (fused_qkv's LoRA unit, the LoRA
  linear) skip their base GEMM and dequantization and keep what their backward reads. Not where
  q and k pass an RMSNorm before RoPE (Qwen3): its backward reads them, so they are computed.

On the H100 (Llama-3-8B shapes, same run, benchmarks/results/train_8b_replay_h100.json) the step
ran 6.9% faster at 2048 tokens and 8.5% at 8192, with a slightly lower peak (the recomputation's
q/k/v and o outputs no longer form); docs/training_step_budget.md has the analysis. The kept
values are the first forward's own bits, so the gradients are those of the full recomputation
(tests/test_attention_replay.py compares them bit for bit on the CPU).

Applies to transformers' Llama-family decoder layers whose attention is fused_blocks' (or
fused_qkv's) forward, for causal self-attention without a mask, dropout, cache or sliding window
through the "sdpa" implementation, in a checkpointed layer that offloads its input
(REPLAY = "offloaded"), on the CPU and on CUDA devices of compute capability 8.0+ in fp16/bf16
with head dims up to 128 and more than one token (cuDNN's attention). Anything else is
recomputed as before.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor

from . import checkpointing

#: When a checkpointed layer keeps its attention half: "offloaded" (where the layer's input is
#: offloaded to host memory: the kept tensors go there too and cost no device memory), "always"
#: (also kept on the device by layers that do not offload: more device memory; tests), "never".
REPLAY = "offloaded"

_state = threading.local()


# ---- the attention kernels, with the log-sum-exp their backward needs ------------------------


def _cudnn_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    # (cuDNN's frontend rejects one query over one key: "s_q = s_kv = 1 is not supported")
    return (q.is_cuda and q.shape[2] > 1 and q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
            and torch.backends.cuda.cudnn_sdp_enabled() and torch.cuda.get_device_capability(q.device)[0] >= 8)  # fmt: skip


def _cpu_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and q.dtype == k.dtype == v.dtype and q.shape[-1] == k.shape[-1] == v.shape[-1])  # fmt: skip


def kernel_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `_KeptAttention` has a kernel for these [B, H, T, D] inputs (causal, no mask)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        return False
    if q.shape[1] % k.shape[1] != 0:
        return False
    return _cudnn_applies(q, k, v) or _cpu_applies(q, k, v)


def _repeat_heads(t: Tensor, groups: int) -> Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, tuple]:
    """(output [B, H, T, D], log-sum-exp, what the backward kernel needs besides) of causal
    attention. cuDNN takes grouped K/V heads as they are; the CPU kernel gets them repeated."""
    if q.is_cuda:
        (out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _) = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False, scale=scale)  # fmt: skip
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    groups = q.shape[1] // k.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, _repeat_heads(k, groups), _repeat_heads(v, groups), 0.0, True, scale=scale)  # fmt: skip
    return out, lse, ()


def _attend_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, extra: tuple,
                     scale: float) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    if q.is_cuda:
        cum_q, cum_k, max_q, max_k, seed, offset = extra
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale)  # fmt: skip
    groups = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, _repeat_heads(k, groups), _repeat_heads(v, groups), out, lse, 0.0, True, scale=scale)  # fmt: skip
    if groups > 1:  # the repeated heads' gradients summed back onto their K/V head
        b, hk, t, d = k.shape
        dk = dk.view(b, hk, groups, t, d).sum(2)
        dv = dv.view(b, hk, groups, t, d).sum(2)
    return dq, dk, dv


class _KeptAttention(torch.autograd.Function):
    """Causal attention of q [B, Hq, T, D], k, v [B, Hk, T, D] -> output [B, T, Hq, D] (contiguous,
    what transformers' attention functions return). `kept`: None computes; else the first
    forward's (q, k, v, output [B, T, Hq, D], lse, extra), returned and kept for the backward
    without running any kernel (q, k, v then only carry the gradient's path)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, kept):
        if kept is None:
            out, lse, extra = _attend(q, k, v, scale)
            out = out.transpose(1, 2)  # [B, T, H, D]: contiguous as cuDNN lays it out for BTHD inputs
            if not out.is_contiguous():
                out = out.contiguous()
        else:
            q, k, v, out, lse, extra = kept
        ctx.scale, ctx.extra = scale, extra
        ctx.save_for_backward(q, k, v, out, lse)
        if kept is None and _recording() is not None:
            _recording().append((q, k, v, out, lse, extra))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous().transpose(1, 2)  # the layout of the output it belongs to
        dq, dk, dv = _attend_backward(dout, q, k, v, out.transpose(1, 2), lse, ctx.extra, ctx.scale)
        return dq, dk, dv, None, None


class _ReplayedAdd(torch.autograd.Function):
    """residual + update, whose value the first forward kept: returned as is (`value`); the
    gradient reaches both addends. `on_backward` runs first in the backward (the MLP half's
    backward is done then: checkpointing brings the next layer's kept tensors back meanwhile).
    `value` None: a sum nobody reads (the recomputed layer's output, which only carries its
    gradient), returned as an uninitialised stand-in of its shape: no add launched."""

    @staticmethod
    def forward(ctx, residual, update, value, on_backward):
        ctx.on_backward = on_backward
        if value is None:
            return residual.new_empty(()).expand(residual.shape)
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        if ctx.on_backward is not None:
            ctx.on_backward()
        return grad, grad, None, None


# ---- recording and replay around one layer's attention ------------------------------------------


def replaying() -> bool:
    """Whether this layer's attention is about to be replayed (the recomputation, before it)."""
    return getattr(_state, "replaying", None) is not None


def _recording() -> list | None:
    return getattr(_state, "recording", None)


@contextlib.contextmanager
def _scope(recording: list | None, replaying: tuple | None):
    previous = getattr(_state, "recording", None), getattr(_state, "replaying", None)
    _state.recording, _state.replaying = recording, replaying
    try:
        yield
    finally:
        _state.recording, _state.replaying = previous


def attention_call(q: Tensor, k: Tensor, v: Tensor, scale: float, attention_mask, dropout: float,
                   kwargs: dict, record: bool = True) -> Tensor | None:  # fmt: skip
    """For fused_blocks.hf_attention: the attention output [B, T, Hq, D] where this layer's
    attention half is being recorded or replayed and the call is one `_KeptAttention` takes
    (causal, no mask, no dropout, no variable-length kwargs); None otherwise (the caller runs
    transformers' attention function). `record` False: a recording layer does not keep this call
    (`_KeptAttention` runs cuDNN's kernels, which fused_blocks.SDPA_PRIORITY may rank below
    another backend); a replay the first forward kept is still consumed."""
    replaying = getattr(_state, "replaying", None)
    if replaying is not None:  # the first forward checked this call (the same one) and kept its result
        _state.replaying = None  # consumed: one attention per layer
        return _KeptAttention.apply(q, k, v, scale, replaying)
    if not record or _recording() is None:
        return None
    if attention_mask is not None or dropout != 0.0 or any(key.startswith(("cu_seq", "max_length")) for key in kwargs):
        return None
    if not kernel_applies(q, k, v):
        return None
    return _KeptAttention.apply(q, k, v, scale, None)


def _wanted_here() -> bool:
    if REPLAY not in ("offloaded", "always", "never"):
        raise ValueError(f'attention_replay.REPLAY must be "offloaded", "always" or "never", got {REPLAY!r}')
    if REPLAY == "never":
        return False
    if checkpointing.recomputing():
        return True
    return checkpointing.first_forward() and (REPLAY == "always" or checkpointing.offloading())


def _kept_for_offload(h: Tensor, attention: tuple) -> tuple:
    """What to remember offloaded: h, the output and the tensors q/k/v are views of (one
    [.., Nq+Nk+Nv] projection buffer where the fused Q/K/V unit made them: one transfer); and,
    kept on the device, the LSE (Hq fp32 a token: 256 KiB a layer at 2048 tokens, a copy's host
    bookkeeping saved per layer) with how to rebuild q, k, v."""
    q, k, v, out, lse, extra = attention
    roots, views = [], []
    for t in (q, k, v):
        root = t._base if t._base is not None else t
        if not root.is_contiguous():  # (offloading takes contiguous tensors): a copy, viewed as itself
            root = t = t.contiguous()
        index = next((i for i, r in enumerate(roots) if r is root), None)
        if index is None:
            roots.append(root)
            index = len(roots) - 1
        views.append((index, tuple(t.shape), t.stride(), t.storage_offset() - root.storage_offset()))
    return (h, out, *roots), (views, extra, lse)


def _rebuilt(kept: tuple, layout) -> tuple[Tensor, tuple]:
    views, extra, lse = layout
    h, out, *roots = kept
    q, k, v = (roots[i].as_strided(shape, stride, roots[i].storage_offset() + offset)
               for i, shape, stride, offset in views)  # fmt: skip
    return h, (q, k, v, out, lse, extra)


def _projections_feed_rope_only(attention) -> bool:
    """Whether q/k/v reach the attention through RoPE alone, whose backward does not read its
    input: then their values are never read in a replayed recomputation and the projections may
    skip them. Not with q/k RMSNorms (Qwen3), whose backward reads q and k."""
    spec = getattr(attention, "_qlora_qkv_spec", None) or getattr(attention, "_qlora_attention_spec", None)
    qk_norm = spec.qk_norm if spec is not None else hasattr(attention, "q_norm") or hasattr(attention, "k_norm")
    return not qk_norm


def decoder_layer_forward(layer, hidden_states: Tensor, **kwargs) -> Tensor | None:
    """transformers' Llama-family decoder layer forward (fused_blocks matched its statements) with
    the attention half kept in a checkpointed layer's first forward and replayed in its
    recomputation; None where that does not apply (the caller runs the class's forward)."""
    if not _wanted_here():
        return None
    key = ("qlora_ext.attention_replay", id(layer))  # the tensors (offloaded); key + ("layout",): how to use them
    residual = hidden_states
    if checkpointing.recomputing():
        values, layout = checkpointing.replayed(key), checkpointing.replayed((*key, "layout"))
        if values is None or layout is None:
            return None  # the first forward kept nothing: recompute as usual
        h_kept, attention = _rebuilt(values, layout)
        normed = layer.input_layernorm(hidden_states)
        skip = _projections_feed_rope_only(layer.self_attn)
        with _scope(None, attention), checkpointing.outputs_unused() if skip else contextlib.nullcontext():
            update, _ = layer.self_attn(hidden_states=normed, **kwargs)
            if getattr(_state, "replaying", None) is not None:
                # the projections skipped their outputs for an attention that never ran: their
                # backward would read garbage. Only if the attention's path changed since the
                # first forward (its fused forward switched off in between).
                raise RuntimeError("attention_replay: the recomputation of a checkpointed layer did not reach the "
                                   "attention its first forward kept; do not switch fused_blocks/fused_qkv forwards "
                                   "between a forward and its backward")  # fmt: skip
        hidden_states = _ReplayedAdd.apply(residual, update, h_kept, checkpointing.prefetcher())
    else:
        recorded: list = []
        normed = layer.input_layernorm(hidden_states)
        with _scope(recorded, None):
            update, _ = layer.self_attn(hidden_states=normed, **kwargs)
        hidden_states = residual + update
        if len(recorded) == 1:
            values, layout = _kept_for_offload(hidden_states, recorded[0])
            checkpointing.remember(key, values, offload=True)
            checkpointing.remember((*key, "layout"), layout)
    residual = hidden_states
    hidden_states = layer.post_attention_layernorm(hidden_states)
    hidden_states = layer.mlp(hidden_states)
    if checkpointing.recomputing() and residual.shape == hidden_states.shape and residual.dtype == hidden_states.dtype:
        return _ReplayedAdd.apply(residual, hidden_states, None, None)  # only its gradient is used
    return residual + hidden_states
