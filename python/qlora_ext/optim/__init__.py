"""Optimizers: PagedAdamW (paged 32-/8-bit AdamW state); LoRA+ parameter groups are
`qlora_ext.loraplus_param_groups`, re-exported here."""

from __future__ import annotations

from . import ops
from ..loraplus import loraplus_param_groups
from .paged_adamw import PagedAdamW

__all__ = ["PagedAdamW", "loraplus_param_groups", "ops"]
