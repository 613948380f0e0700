"""Pure-PyTorch references of the AdamW operators (math: cpp/include/qlora/adamw.h).

Readable and slow. Every step rounds in fp32 in the kernels' order (separate products and sums,
IEEE sqrt and division), so the CPU kernels are expected to match these bit for bit.
"""

from __future__ import annotations

import math

import torch

from .. import reference as _quant_reference

BLOCKSIZE_8BIT = 256


def adamw_hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0) -> dict[str, torch.Tensor]:
    """The kernels' fp32 scalars, each computed in double and rounded once."""
    values = {
        "beta1": beta1,
        "one_minus_beta1": 1.0 - beta1,
        "beta2": beta2,
        "one_minus_beta2": 1.0 - beta2,
        "eps": eps,
        "decay": 1.0 - lr * weight_decay,
        "step_size": lr / (1.0 - math.pow(beta1, step)),
        "inv_bc2_sqrt": 1.0 / math.sqrt(1.0 - math.pow(beta2, step)),
        "grad_scale": grad_scale,
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def adamw_update(p, g, m, v, h):
    """fp32 p, g, m, v -> new (p, m, v)."""
    g = g * h["grad_scale"]
    m = h["beta1"] * m + h["one_minus_beta1"] * g
    v = h["beta2"] * v + h["one_minus_beta2"] * (g * g)
    # torch's vectorised fp32 sqrt can be 1 ulp off; sqrt in fp64 rounded to fp32 is the IEEE
    # (correctly rounded) fp32 sqrt that the kernels compute.
    denom = torch.sqrt(v.double()).float() * h["inv_bc2_sqrt"] + h["eps"]
    p = p * h["decay"] - h["step_size"] * (m / denom)
    return p, m, v


def adamw_step(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step,
               grad_scale=1.0) -> None:  # fmt: skip
    """In place, like the operator (one tensor)."""
    h = adamw_hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale)
    p, m, v = adamw_update(param.float(), grad.float(), exp_avg, exp_avg_sq, h)
    param.copy_(p.to(param.dtype))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def adamw_step_8bit(param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
                    exp_avg_map, exp_avg_sq_map, *, lr, beta1, beta2, eps, weight_decay, step,
                    grad_scale=1.0) -> None:  # fmt: skip
    """In place, like the operator (one tensor): dequantize, update, re-quantize per 256 block."""
    q = _quant_reference
    m = q.blockwise8_dequantize(exp_avg_codes, exp_avg_absmax, exp_avg_map, BLOCKSIZE_8BIT)
    v = q.blockwise8_dequantize(exp_avg_sq_codes, exp_avg_sq_absmax, exp_avg_sq_map, BLOCKSIZE_8BIT)
    h = adamw_hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale)
    p, m, v = adamw_update(param.float().reshape(m.shape), grad.float().reshape(m.shape), m, v, h)
    param.copy_(p.to(param.dtype).reshape(param.shape))
    codes, absmax = q.blockwise8_quantize(m, exp_avg_map, BLOCKSIZE_8BIT)
    exp_avg_codes.copy_(codes)
    exp_avg_absmax.copy_(absmax)
    codes, absmax = q.blockwise8_quantize(v, exp_avg_sq_map, BLOCKSIZE_8BIT)
    exp_avg_sq_codes.copy_(codes)
    exp_avg_sq_absmax.copy_(absmax)
