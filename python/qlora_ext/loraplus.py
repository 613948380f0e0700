"""LoRA+ (Hayou et al. 2024, arXiv 2402.12354): a larger learning rate for B than for A.

    loraplus_param_groups(model, lr, ratio=16) -> [{"params": A-like, "lr": lr},
                                                  {"params": B-like, "lr": lr * ratio}]

Parameter groups for any torch.optim optimizer (or qlora_ext's own): the second group holds every
trainable `lora_B` matrix and every trainable 1-D parameter (DoRA's magnitude, VeRA's d and b,
biases), as PEFT's `create_loraplus_optimizer` groups them; everything else trainable (`lora_A`,
other matrices) is in the first. Frozen parameters (LoRA-FA's A, the NF4 base) are left out.
"""

from __future__ import annotations

import math

from torch import nn


def _positive(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def is_loraplus_b(name: str, param: nn.Parameter) -> bool:
    """Whether LoRA+ gives `param` the raised learning rate: a `lora_B` matrix or any 1-D parameter."""
    return "lora_B" in name.split(".") or param.dim() <= 1


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16, weight_decay: float = 0.0) -> list[dict]:
    """[{"params": [...], "lr": lr, "weight_decay": wd}, {"params": [...], "lr": lr * ratio, ...}]
    for the trainable parameters of `model`; an empty group is omitted.

    Use: `torch.optim.AdamW(qlora_ext.loraplus_param_groups(model, lr=2e-4), lr=2e-4)`.
    ratio: η_B / η_A (the paper's λ; PEFT's docs use 16).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lr = _positive("lr", lr)
    ratio = _positive("ratio", ratio)
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    group_a, group_b, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (group_b if is_loraplus_b(name, p) else group_a).append(p)
    if not group_a and not group_b:
        raise ValueError("the model has no trainable parameters (call qlora_ext.prepare first)")
    groups = [{"params": group_a, "lr": lr, "weight_decay": float(weight_decay)},
              {"params": group_b, "lr": lr * ratio, "weight_decay": float(weight_decay)}]  # fmt: skip
    return [g for g in groups if g["params"]]
