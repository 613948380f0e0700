"""VeRA (Kopiczko et al. ICLR 2024, arXiv 2310.11454): vector-based random matrix adaptation.

    ΔW = diag(b)·B·diag(d)·A        y = x·deq(W)ᵀ (+ bias) + b ⊙ ((d ⊙ (x·Aᵀ))·Bᵀ)

A [r, in_max] and B [out_max, r] are ONE frozen random pair shared by every adapted layer (a
layer [out, in] uses A[:, :in] and B[:out, :]), regenerated from a seed and never stored; each
layer trains only d [r] (`vera_lambda_d`, init `d_initial` = 0.1) and b [out] (`vera_lambda_b`,
init 0, so training starts from the base model).

The shared pair is generated exactly as PEFT documents its `projection_prng_key`: a CPU
`torch.Generator` seeded with the key draws A, then B, each kaiming-uniform in fp32, i.e.
uniform(−√(6/fan_in), √(6/fan_in)) with fan_in = in_max for A and r for B; in_max/out_max are the
largest in/out features among the adapted layers. The file we write says
`"save_projection": false`, so PEFT regenerates the same pair (tests/test_lora_family.py checks
that PEFT reproduces our logits).

Memory: the pair is built once per (seed, r, in_max, out_max, device, dtype) and cached
(`vera_projections`); each adapter holds only its two vectors.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from .adapters import Adapter


@functools.lru_cache(maxsize=8)
def _projections_cpu(seed: int, r: int, in_max: int, out_max: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.empty(r, in_max).uniform_(-math.sqrt(6 / in_max), math.sqrt(6 / in_max), generator=g)
    b = torch.empty(out_max, r).uniform_(-math.sqrt(6 / r), math.sqrt(6 / r), generator=g)
    return a, b


@functools.lru_cache(maxsize=8)
def vera_projections(seed: int, r: int, in_max: int, out_max: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The shared frozen pair (A [r, in_max], B [out_max, r]) for `seed`, on `device` in `dtype`.

    Cached, so always made as normal tensors: a pair first asked for under torch.inference_mode
    (generate) would otherwise be an inference tensor that later training cannot save for backward."""
    with torch.inference_mode(False):
        a, b = _projections_cpu(seed, r, in_max, out_max)
        return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class VeRAAdapter(Adapter):
    """VeRA on one layer [out, in]: trainable `vera_lambda_d` [r] and `vera_lambda_b` [out]
    (PEFT's on-disk keys); the shared projections come from (prng_key, r, in_max, out_max)."""

    peft_type = "VERA"
    method = "vera"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 256,
        prng_key: int = 0,
        projection_shape: tuple[int, int] | None = None,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _positive_int("r (the VeRA rank)", r)
        if not isinstance(prng_key, int) or isinstance(prng_key, bool):
            raise ValueError(f"vera_prng_key must be an int, got {prng_key!r}")
        if not isinstance(d_initial, (int, float)) or isinstance(d_initial, bool) or not math.isfinite(d_initial):
            raise ValueError(f"vera_d_initial must be a finite number, got {d_initial!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        out_max, in_max = projection_shape or (out_features, in_features)
        if in_max < in_features or out_max < out_features:
            raise ValueError(f"projection_shape {(out_max, in_max)} is smaller than the layer [{out_features}, {in_features}]")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.prng_key, self.d_initial, self.dropout_p = r, prng_key, float(d_initial), float(dropout)
        self.projection_shape = (out_max, in_max)
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def projections(self, device, dtype) -> tuple[Tensor, Tensor]:
        """This layer's slices of the shared pair: A [r, in], B [out, r]."""
        out_max, in_max = self.projection_shape
        a, b = vera_projections(self.prng_key, self.r, in_max, out_max, torch.device(device), dtype)
        return a[:, : self.in_features], b[: self.out_features, :]

    def delta(self, x: Tensor) -> Tensor:
        a, b = self.projections(x.device, x.dtype)
        xd = self.dropout(x) @ a.t() * self.vera_lambda_d.to(x.dtype)  # [..., r]
        return (xd @ b.t()) * self.vera_lambda_b.to(x.dtype)  # [..., out]

    def delta_weight(self) -> Tensor:
        a, b = self.projections(self.vera_lambda_b.device, torch.float32)
        d, bb = self.vera_lambda_d.detach().float(), self.vera_lambda_b.detach().float()
        return (bb[:, None] * b * d[None, :]) @ a  # [out, r]·[r, in]

    # ---- config ---------------------------------------------------------------------------------

    def peft_config(self) -> dict:
        return {"r": self.r, "projection_prng_key": self.prng_key, "d_initial": self.d_initial,
                "vera_dropout": self.dropout_p}  # fmt: skip

    @classmethod
    def peft_model_config(cls, layer_configs: dict[str, dict]) -> dict:
        configs = list(layer_configs.values())
        for field in ("r", "projection_prng_key"):
            if len({c[field] for c in configs}) != 1:
                raise ValueError(f"VeRA shares one projection pair: every layer needs the same {field}")
        return {**configs[0], "save_projection": False, "init_weights": True}

    @classmethod
    def validate_peft_config(cls, config: dict) -> None:
        _positive_int("field 'r'", config.get("r", 256))
        if config.get("save_projection", True):
            raise ValueError("save_projection=true (projections stored in the file) is not supported; "
                             "qlora_ext regenerates them from projection_prng_key")  # fmt: skip
        key = config.get("projection_prng_key", 0)
        if not isinstance(key, int) or isinstance(key, bool):
            raise ValueError(f"field 'projection_prng_key' must be an int, got {key!r}")

    @classmethod
    def shared_config(cls, config: dict, shapes: list[tuple[int, int]]) -> dict:
        return {"projection_shape": (max(o for o, _ in shapes), max(i for _, i in shapes))}

    @classmethod
    def from_peft_config(cls, in_features, out_features, config, device=None, dtype=None) -> "VeRAAdapter":
        return cls(in_features, out_features, config.get("r", 256), config.get("projection_prng_key", 0),
                   config.get("projection_shape"), config.get("d_initial", 0.1), config.get("vera_dropout", 0.0),
                   device=device, dtype=dtype)  # fmt: skip

    def apply_peft_config(self, config: dict) -> None:
        if config.get("r", 256) != self.r:
            raise ValueError(f"VeRA rank {config.get('r')} differs from this adapter's {self.r}")
        self.prng_key = config.get("projection_prng_key", 0)
        if config.get("projection_shape") is not None:
            self.projection_shape = tuple(config["projection_shape"])

    def extra_repr(self) -> str:
        return f"r={self.r}, prng_key={self.prng_key}, projection_shape={self.projection_shape}, dropout={self.dropout_p}"
