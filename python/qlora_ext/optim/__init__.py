"""Optimizers: PagedAdamW (paged 32-/8-bit AdamW state) and LoRA+ parameter groups."""

from __future__ import annotations

import torch

from . import ops
from .paged_adamw import PagedAdamW


def loraplus_param_groups(
    model: torch.nn.Module, lr: float, ratio: float = 16.0, weight_decay: float | None = None
) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): the B matrices learn `ratio` times faster than A.

    Returns two param groups of the trainable parameters: those whose name contains "lora_B",
    and 1-D adapter parameters (e.g. DoRA magnitudes, biases), at lr * ratio; the rest at lr.
    `weight_decay`, if given, is set on both groups. Empty groups are left out.
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    fast, slow = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (fast if "lora_B" in name or p.ndim == 1 else slow).append(p)
    groups = [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * ratio}]
    if weight_decay is not None:
        for g in groups:
            g["weight_decay"] = weight_decay
    return [g for g in groups if g["params"]]


__all__ = ["PagedAdamW", "loraplus_param_groups", "ops"]
