"""Cross-entropy fused with the LM head, chunked over tokens: the [tokens, vocab] logits never exist
in full.

A causal LM's loss is mean_t CE(h_t · Wᵀ, y_t). Done plainly (transformers), the logits of every
token are formed in the model's dtype, upcast to fp32 for the loss, and kept for backward: for
Llama-3-8B shapes at 2048 tokens that is 2048 x 128,256 x (2 + 4 + 4 for the gradient) bytes
~2.6 GB, the largest single term of a QLoRA step's peak memory. Here the tokens go through in
chunks: per chunk the logits are formed (model dtype, as the plain path), upcast, reduced to the
chunk's loss, and turned at once into the chunk's gradient with respect to the hidden states,

    dL/dh_t = (softmax(z_t) - onehot(y_t)) · W / n_valid,

which is all backward needs; the chunk's logits are then freed. Memory: one chunk's logits (fp32
and model dtype) plus dL/dh [tokens, hidden]. Compute: the same two GEMMs as the plain path's
forward and input-gradient (the LM head's weight gradient only when the head trains).

The numbers are the plain path's: logits rounded to the model dtype by the GEMM, loss in fp32, the
logit gradient rounded to the model dtype before the input-gradient GEMM, as autograd does there.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor

from . import device_memory

IGNORE_INDEX = -100

#: Default bytes for one chunk's logits (fp32, exponentiated in place, + the model-dtype copy); see chunk_tokens.
CHUNK_BYTES = 128 << 20


def chunk_tokens(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Tokens per chunk: enough to keep the GEMMs efficient (>= 128 rows where there are that
    many: against a 128k vocabulary that is still ~500 output tiles), few enough that one chunk's
    logits take at most CHUNK_BYTES and 1/8 of the free memory. (At Llama-3-8B shapes, seq 2048,
    H100 runs before and after the in-place log-sum-exp and 128-token chunks peaked alike, 6.47
    GiB: the step's peak is elsewhere.)"""
    budget = CHUNK_BYTES
    if device.type == "cuda":
        budget = min(budget, device_memory.available_bytes(device) // 8)
    per_token = vocab * 8  # fp32 logits, exponentiated in place + the model-dtype copy for the GEMM
    return max(1, min(n_tokens, max(128, budget // per_token)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                ignore_index: int, chunk: int, divisor: Tensor | None):  # fmt: skip
        n_tokens = hidden.shape[0]
        valid = targets != ignore_index
        count = valid.sum() if divisor is None else divisor.to(hidden.device)
        count = count.float()
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for begin in range(0, n_tokens, chunk):
            end = min(n_tokens, begin + chunk)
            h = hidden[begin:end]
            z = torch.nn.functional.linear(h, weight, bias).float()  # [c, V], the plain path's rounding
            y = targets[begin:end]
            ok = valid[begin:end]
            safe_y = torch.where(ok, y, 0).unsqueeze(1)
            picked = z.gather(1, safe_y).squeeze(1)
            # log-sum-exp with z turned into exp(z - max) in place: torch.logsumexp would allocate
            # a second [c, V] fp32 buffer (131 MB per 256 tokens of a 128k vocabulary).
            z_max = z.amax(dim=1, keepdim=True)
            z.sub_(z_max).exp_()
            sum_exp = z.sum(dim=1)
            lse = z_max.squeeze(1) + sum_exp.log()
            loss_sum += torch.where(ok, lse - picked, 0.0).sum()
            if not (need_h or need_w or need_b):
                continue
            # z becomes dL/dz in place: softmax - onehot on valid rows, 0 on ignored ones, / count.
            weight_row = ok.float() / count
            z.mul_((weight_row / sum_exp).unsqueeze(1))
            z.scatter_add_(1, safe_y, weight_row.neg().unsqueeze(1))
            dz = z.to(hidden.dtype)
            del z
            if need_h:
                torch.mm(dz, weight, out=grad_h[begin:end])
            if need_w:
                grad_w.addmm_(dz.t().float(), h.float())
            if need_b:
                grad_b += dz.float().sum(0)
            # Free this chunk's dL/dz now: bound until the next chunk's assignment, it would stay alive
            # beside that chunk's logits, a second model-dtype [c, V] buffer at the peak.
            del dz
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # Scaled on the device (no sync to test for the usual grad_loss == 1).
        dh = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        db = None if grad_b is None else (grad_b * grad_loss).to(ctx.bias_dtype)
        return dh, dw, db, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk: int | None = None,
    num_items: int | Tensor | None = None,
) -> Tensor:
    """mean CE(hidden · weightᵀ + bias, targets) over targets != ignore_index (or the sum divided
    by `num_items`, as transformers' `num_items_in_batch`), without forming all logits at once.

    hidden [..., H] (any float dtype; the logits take its dtype, as nn.Linear would give them),
    weight [V, H], targets [...] int64 (already aligned with hidden: no shifting here; see
    causal_lm_loss). Differentiable in hidden, weight and bias. All tokens ignored: NaN, as
    torch's cross_entropy."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets has shape {tuple(targets.shape)} but hidden has leading shape "
                         f"{tuple(hidden.shape[:-1])}")  # fmt: skip
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a float tensor, got {hidden.dtype}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).long()
    if chunk is None:
        chunk = chunk_tokens(h.shape[0], weight.shape[0], h.device)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    divisor = None
    if num_items is not None:
        divisor = num_items if isinstance(num_items, Tensor) else torch.tensor(float(num_items))
    w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
    b = None if bias is None else (bias if bias.dtype == h.dtype else bias.to(h.dtype))
    return _LinearCrossEntropy.apply(h, w, b, y, ignore_index, chunk, divisor)


def causal_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *,
                   ignore_index: int = IGNORE_INDEX, shift_labels: Tensor | None = None,
                   num_items: int | Tensor | None = None, chunk: int | None = None) -> Tensor:  # fmt: skip
    """The next-token loss of transformers' causal LMs: position t predicts labels[t + 1] (or
    shift_labels[t] when given), the last position predicts nothing, mean over valid tokens."""
    if shift_labels is None:
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels has shape {tuple(labels.shape)} but the hidden states have "
                             f"leading shape {tuple(hidden.shape[:-1])}")  # fmt: skip
        hidden, shift_labels = hidden[..., :-1, :], labels[..., 1:]
    return linear_cross_entropy(hidden, weight, shift_labels, bias, ignore_index=ignore_index,
                                chunk=chunk, num_items=num_items)  # fmt: skip


# ---- wiring into transformers models -------------------------------------------------------------

#: Causal LMs whose logits are exactly lm_head(last hidden state): no soft-capping or logit scaling.
FUSED_LOSS_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe")


def supports_fused_loss(model) -> bool:
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) in FUSED_LOSS_MODEL_TYPES
        and isinstance(getattr(model, "lm_head", None), torch.nn.Linear)
        and isinstance(getattr(model, "model", None), torch.nn.Module)
        and not getattr(config, "final_logit_softcapping", None)
        and getattr(config, "logit_scale", None) in (None, 1, 1.0)
    )


def enable_fused_loss(model) -> bool:
    """Makes `model(..., labels=...)` compute its loss with causal_lm_loss while gradients are
    enabled (training); the output's `logits` is then None. Without labels, or under no_grad
    (evaluation, generation), the model's own forward runs. Returns whether it was enabled (only
    for the model types in FUSED_LOSS_MODEL_TYPES). Idempotent."""
    if not supports_fused_loss(model):
        return False
    if getattr(model, "_qlora_fused_loss", False):
        return True
    # A bound method (not a closure over `model`): copy.deepcopy rebinds it to the copy.
    model.forward = types.MethodType(_fused_loss_forward, model)
    model._qlora_fused_loss = True
    return True


def _fused_loss_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                        inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):  # fmt: skip
    if labels is None or not torch.is_grad_enabled() or kwargs.get("return_dict") is False:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values,
                                  inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)  # fmt: skip
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs)  # fmt: skip
    head = self.lm_head
    loss = causal_lm_loss(outputs.last_hidden_state, head.weight, labels, head.bias,
                          ignore_index=ignore_index, shift_labels=shift_labels, num_items=num_items)  # fmt: skip
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)  # fmt: skip


def disable_fused_loss(model) -> None:
    if getattr(model, "_qlora_fused_loss", False):
        del model.forward  # the instance attribute; the class's forward shows through again
        model._qlora_fused_loss = False


__all__ = ["linear_cross_entropy", "causal_lm_loss", "enable_fused_loss", "disable_fused_loss",
           "supports_fused_loss", "chunk_tokens"]  # fmt: skip
