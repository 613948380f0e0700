"""Per-layer activation checkpointing with one autograd node per layer.

torch.utils.checkpoint's non-reentrant mode (what transformers uses by default) hooks every tensor
a layer saves for backward: on the H100 machine's host that was ~2,800 pack/unpack hook calls per
Llama-3-8B step, ~0.1 s of Python, while the GPU waited. Here a decoder layer is one
autograd.Function: forward runs the layer without building a graph and saves only its positional
tensor inputs (the hidden states); backward re-runs the layer with gradients enabled from those
inputs, under the same RNG and autocast state, and backpropagates through the recomputed graph
(the "reentrant" scheme: adapter gradients are accumulated into `.grad` by that inner backward, so
use `loss.backward()`, not `torch.autograd.grad`, for the parameters inside checkpointed layers).

Layers whose inputs do not require grad (the first decoder layer after a frozen embedding) still
get an autograd node: a zero-size dummy input that requires grad is passed alongside.

    qlora_ext.checkpointing.enable(model)   # transformers models; prepare() calls it
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor


_phase = threading.local()


_calls = iter(range(1, 1 << 62))  # tokens of checkpointed calls


def phase() -> tuple[str, int] | None:
    """("forward", token) while a checkpointed layer runs its first (graph-less) forward,
    ("recompute", the same token) while its backward replays it, None elsewhere. Layers may pass
    values that depend only on the parameters (DoRA's weight norm) from the first to the second,
    keyed by the token: checkpointing itself relies on the parameters not changing in between."""
    return getattr(_phase, "value", None)


@contextlib.contextmanager
def _in_phase(value: tuple[str, int]):
    previous = phase()
    _phase.value = value
    try:
        yield
    finally:
        _phase.value = previous


class _LayerCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, dummy, *args):
        ctx.fn = fn
        ctx.tensor_positions = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.constants = [None if isinstance(a, Tensor) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_positions))
        ctx.device = next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
        ctx.autocast = [(t, torch.get_autocast_dtype(t)) for t in ("cuda", "cpu") if torch.is_autocast_enabled(t)]
        ctx.token = next(_calls)
        with torch.no_grad(), _in_phase(("forward", ctx.token)):
            return fn(*args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        saved = ctx.saved_tensors
        args = list(ctx.constants)
        inputs = []
        for position, tensor in zip(ctx.tensor_positions, saved):
            leaf = tensor.detach().requires_grad_(tensor.requires_grad)
            args[position] = leaf
            inputs.append(leaf)
        devices = [ctx.device] if ctx.device_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), _autocast(ctx.autocast), \
                _in_phase(("recompute", ctx.token)):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_rng is not None:
                torch.cuda.set_rng_state(ctx.device_rng, ctx.device)
            outputs = ctx.fn(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if isinstance(o, Tensor) and o.requires_grad and g is not None]  # fmt: skip
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads: list[Tensor | None] = [None] * len(ctx.constants)
        for position, leaf in zip(ctx.tensor_positions, inputs):
            grads[position] = leaf.grad
        ctx.fn = None  # the layer's closure (and the kwargs it holds) can go now
        return (None, None, *grads)


def _autocast(states):
    stack = contextlib.ExitStack()
    for device_type, dtype in states:
        stack.enter_context(torch.autocast(device_type, dtype=dtype))
    return stack


def checkpoint(fn, *args, **kwargs):
    """Runs fn(*args, **kwargs) keeping only the tensors in `args` for backward (see the module
    docstring). Same call shape as torch.utils.checkpoint.checkpoint; its keyword options
    (use_reentrant, ...) are accepted and ignored."""
    for option in ("use_reentrant", "preserve_rng_state", "determinism_check", "debug"):
        kwargs.pop(option, None)
    if kwargs:
        fn = _bind(fn, kwargs)
    if not torch.is_grad_enabled():
        return fn(*args)
    dummy = torch.empty(0, requires_grad=True)
    return _LayerCheckpoint.apply(fn, dummy, *args)


def _bind(fn, kwargs):
    def bound(*args):
        return fn(*args, **kwargs)

    return bound


def enable(model: torch.nn.Module) -> bool:
    """Checkpoint each decoder layer of a transformers model with `checkpoint`. Returns False
    (nothing changed) for models without transformers' per-layer checkpointing hooks."""
    setter = getattr(model, "_set_gradient_checkpointing", None)
    if not callable(setter) or not getattr(model, "supports_gradient_checkpointing", False):
        return False
    setter(enable=True, gradient_checkpointing_func=checkpoint)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
    return True


def is_enabled(model: torch.nn.Module) -> bool:
    return any(getattr(m, "_gradient_checkpointing_func", None) is checkpoint and getattr(m, "gradient_checkpointing", False)
               for m in model.modules())  # fmt: skip
