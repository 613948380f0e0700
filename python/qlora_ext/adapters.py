"""Adapters: trainable updates of a frozen (NF4) base layer, behind one small interface.

An `Adapter` is an nn.Module whose parameter names are exactly the per-layer suffixes PEFT writes
on disk (LoRA: `lora_A.weight` [r, in], `lora_B.weight` [out, r]), so saving and loading need no
per-variant code: the on-disk key is `<layer path>.<adapter parameter name>`.

A new variant is a new subclass in its own file (dora.py, lora_fa.py, vera.py, delta_lora.py;
methods.py maps `prepare(method=...)` names and adapter_config.json to classes): it implements
`delta` and `delta_weight` (or `merged_weight` when it rescales W, as DoRA), its config fields
(`peft_config`, `peft_model_config`, `from_peft_config`), and may override `forward_with_base`
when it can fuse its update with the base GEMM (LoRA does).
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import Tensor, nn

from .lora_linear import nf4_lora_linear


class Adapter(nn.Module):
    """One named update of a base linear layer W [out, in]."""

    #: PEFT's `peft_type` for adapter_config.json
    peft_type: str = ""
    #: the name `prepare(method=...)` selects this variant by
    method: str = ""

    def delta(self, x: Tensor) -> Tensor:
        """The update to add to the base output: x [..., in] -> [..., out]."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """The dense equivalent ΔW [out, in] (fp32), for merging and export."""
        raise NotImplementedError

    def merged_weight(self, w: Tensor) -> Tensor:
        """The dense weight this adapter makes of base weight w [out, in] (fp32): w + ΔW by default;
        variants that rescale W (DoRA) override it."""
        return w + self.delta_weight().to(w.device)

    def unmerged_weight(self, w: Tensor) -> Tensor:
        """The inverse of `merged_weight` (used by QLoRALinear.unmerge)."""
        return w - self.delta_weight().to(w.device)

    def forward_with_base(self, layer, x: Tensor) -> Tensor:
        """Base output plus update. `layer` is the QLoRALinear; override to fuse the two."""
        return layer.base_forward(x) + self.delta(x).to(x.dtype)

    def mark_trainable(self) -> None:
        """Set requires_grad on the parameters this variant trains (all of them by default)."""
        for p in self.parameters():
            p.requires_grad_(True)

    def peft_config(self) -> dict:
        """This adapter's (one layer's) fields of PEFT's adapter_config.json."""
        raise NotImplementedError

    @classmethod
    def peft_model_config(cls, layer_configs: dict[str, dict]) -> dict:
        """The variant-specific fields of adapter_config.json, from every layer's `peft_config()`
        (layer path -> fields). The common fields (peft_type, target_modules, ...) are added by
        adapters_io."""
        raise NotImplementedError

    @classmethod
    def validate_peft_config(cls, config: dict) -> None:
        """Raise ValueError (naming the field) if adapter_config.json `config` cannot be loaded."""

    @classmethod
    def shared_config(cls, config: dict, shapes: list[tuple[int, int]]) -> dict:
        """Fields derived from all the adapted layers' shapes [(out, in), ...], merged into every
        layer's config on load (VeRA: the size of the shared projections). None by default."""
        return {}

    @classmethod
    def from_peft_config(cls, in_features: int, out_features: int, config: dict, device=None, dtype=None) -> "Adapter":
        """A fresh adapter for a layer [out, in] as described by adapter_config.json fields."""
        raise NotImplementedError

    def apply_peft_config(self, config: dict) -> None:
        """Adopt the non-shape fields of `config` (e.g. LoRA's alpha) when loading saved weights."""


class LoRAAdapter(Adapter):
    """LoRA: ΔW = s·B·A with A [r, in] (kaiming-uniform), B [out, r] (zeros, so it starts as a no-op),
    s = alpha/r, or alpha/√r with rsLoRA. Dropout applies to the input of the low-rank path only.
    """

    peft_type = "LORA"
    method = "lora"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 16,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r (the LoRA rank) must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.r, self.alpha, self.rslora, self.dropout_p = r, alpha, bool(rslora), float(dropout)
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: Tensor) -> Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        return (self.dropout(x).to(a.dtype) @ a.t()) @ b.t() * self.scale

    def delta_weight(self) -> Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale  # [out, r]·[r, in]

    def forward_with_base(self, layer, x: Tensor) -> Tensor:
        x_lora = self.dropout(x) if self.training and self.dropout_p > 0 else None
        return nf4_lora_linear(x, layer.weight, layer.bias, self.lora_A.weight, self.lora_B.weight, self.scale, x_lora)

    def peft_config(self) -> dict:
        return {"r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout_p, "use_rslora": self.rslora}

    @classmethod
    def peft_model_config(cls, layer_configs: dict[str, dict]) -> dict:
        """The most common r and alpha, plus rank_pattern/alpha_pattern for the layers that differ."""
        first = next(iter(layer_configs.values()))
        base = {k: Counter(c[k] for c in layer_configs.values()).most_common(1)[0][0] for k in first}
        return {
            **base,
            "use_dora": False,
            "init_lora_weights": True,
            "rank_pattern": {p: c["r"] for p, c in layer_configs.items() if c["r"] != base["r"]},
            "alpha_pattern": {p: c["lora_alpha"] for p, c in layer_configs.items() if c["lora_alpha"] != base["lora_alpha"]},
        }

    @classmethod
    def validate_peft_config(cls, config: dict) -> None:
        for field in ("r", "lora_alpha"):
            value = config.get(field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"field {field!r} must be a positive number, got {value!r}")

    @classmethod
    def from_peft_config(cls, in_features, out_features, config, device=None, dtype=None) -> "LoRAAdapter":
        return cls(in_features, out_features, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                   config.get("use_rslora", False), device=device, dtype=dtype)  # fmt: skip

    def apply_peft_config(self, config: dict) -> None:
        self.alpha, self.rslora = config["lora_alpha"], bool(config.get("use_rslora", False))
        self.scale = self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout_p}, rslora={self.rslora}"
