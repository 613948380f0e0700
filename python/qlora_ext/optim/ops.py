"""Python face of the AdamW operators (schemas: cpp/torch/schemas.cpp; math: qlora/adamw.h):
typed wrappers over tensor lists, and fake kernels for torch.compile.

Both operators update params and state in place and return nothing, so their fakes only check
what they can without reading data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._native import native

BLOCKSIZE_8BIT = 256


def _ops():
    native()
    return torch.ops.qlora_ext


def _as_list(x):
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _check_dense(**lists) -> None:
    # The dispatcher would reject a sparse tensor with a message naming the backend, not the
    # argument; say which one it is.
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t.layout != torch.strided:
                raise ValueError(f"{name}[{i}] must be a dense tensor, got layout {t.layout} "
                                 "(sparse gradients are not supported)")  # fmt: skip


def adamw_step(
    params: torch.Tensor | Sequence[torch.Tensor],
    grads: torch.Tensor | Sequence[torch.Tensor],
    exp_avgs: torch.Tensor | Sequence[torch.Tensor],
    exp_avg_sqs: torch.Tensor | Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
) -> None:
    """One AdamW update, in place, of each `params[i]` (fp32/fp16/bf16, contiguous) with fp32
    state `exp_avgs[i]`, `exp_avg_sqs[i]` (numel as the param). `step` counts this update (>= 1)."""
    params, grads, exp_avgs, exp_avg_sqs = map(_as_list, (params, grads, exp_avgs, exp_avg_sqs))
    _check_dense(params=params, grads=grads)
    _ops().adamw_step(
        params, grads, exp_avgs, exp_avg_sqs,
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step),
        float(grad_scale),
    )  # fmt: skip


def adamw_step_8bit(
    params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
    exp_avg_map: torch.Tensor, exp_avg_sq_map: torch.Tensor, *, lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, step: int, grad_scale: float = 1.0,
) -> None:  # fmt: skip
    """AdamW with 8-bit blockwise state, in place: codes uint8 [n], absmax fp32 [ceil(n/256)];
    m against `exp_avg_map` (signed dynamic map), v against `exp_avg_sq_map` (unsigned)."""
    params, grads = _as_list(params), _as_list(grads)
    _check_dense(params=params, grads=grads)
    _ops().adamw_step_8bit(
        params, grads, _as_list(exp_avg_codes), _as_list(exp_avg_absmax),
        _as_list(exp_avg_sq_codes), _as_list(exp_avg_sq_absmax), exp_avg_map, exp_avg_sq_map,
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step),
        float(grad_scale),
    )  # fmt: skip


# ---- fake kernels ---------------------------------------------------------------------------

_fakes_registered = False


def _check_lists(**lists):
    names = list(lists)
    n = len(lists[names[0]])
    for name in names[1:]:
        torch._check(
            len(lists[name]) == n,
            lambda name=name: f"{name} has {len(lists[name])} tensors but {names[0]} has {n}",
        )


def register_fakes() -> None:
    """Registers the fake kernels once the library is loaded (called on package import)."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("qlora_ext::adamw_step")
    def _(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
          grad_scale=1.0):  # fmt: skip
        _check_lists(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            torch._check(g.dtype == p.dtype, lambda i=i: f"grads[{i}] must have its param's dtype")
            torch._check(m.dtype == torch.float32, lambda i=i: f"exp_avgs[{i}] must be float32")
            torch._check(v.dtype == torch.float32, lambda i=i: f"exp_avg_sqs[{i}] must be float32")
            torch._check(g.numel() == p.numel(), lambda i=i: f"grads[{i}] size != params[{i}] size")
            torch._check(m.numel() == p.numel(), lambda i=i: f"exp_avgs[{i}] size != params[{i}] size")
            torch._check(v.numel() == p.numel(), lambda i=i: f"exp_avg_sqs[{i}] size != params[{i}] size")
        torch._check(step >= 1, lambda: "step must be >= 1")
        return None

    @torch.library.register_fake("qlora_ext::adamw_step_8bit")
    def _(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
          exp_avg_map, exp_avg_sq_map, lr, beta1, beta2, eps, weight_decay, step,
          grad_scale=1.0):  # fmt: skip
        _check_lists(params=params, grads=grads, exp_avg_codes=exp_avg_codes,
                     exp_avg_absmax=exp_avg_absmax, exp_avg_sq_codes=exp_avg_sq_codes,
                     exp_avg_sq_absmax=exp_avg_sq_absmax)  # fmt: skip
        for i, p in enumerate(params):
            n_blocks = (p.numel() + BLOCKSIZE_8BIT - 1) // BLOCKSIZE_8BIT
            torch._check(grads[i].dtype == p.dtype, lambda i=i: f"grads[{i}] must have its param's dtype")
            torch._check(exp_avg_codes[i].dtype == torch.uint8, lambda i=i: f"exp_avg_codes[{i}] must be uint8")
            torch._check(exp_avg_codes[i].numel() == p.numel(), lambda i=i: f"exp_avg_codes[{i}] size")
            torch._check(exp_avg_sq_codes[i].numel() == p.numel(), lambda i=i: f"exp_avg_sq_codes[{i}] size")
            torch._check(exp_avg_absmax[i].numel() == n_blocks, lambda i=i: f"exp_avg_absmax[{i}] size")
            torch._check(exp_avg_sq_absmax[i].numel() == n_blocks, lambda i=i: f"exp_avg_sq_absmax[{i}] size")
        torch._check(exp_avg_map.numel() == 256, lambda: "exp_avg_map must have 256 entries")
        torch._check(exp_avg_sq_map.numel() == 256, lambda: "exp_avg_sq_map must have 256 entries")
        return None
