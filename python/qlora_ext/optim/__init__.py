"""Optimizers: PagedAdamW (paged 32-/8-bit AdamW state) and LoRA+ parameter groups."""

from __future__ import annotations

from . import ops

__all__ = ["ops"]
