"""The LoRA family by name: which Adapter class `prepare(method=...)` builds, and which class an
adapter_config.json describes.

    method        class              on disk (adapter_config.json)
    "lora"        LoRAAdapter        peft_type LORA                    (rsLoRA: use_rslora)
    "dora"        DoRAAdapter        peft_type LORA, use_dora true
    "lora_fa"     LoRAFAAdapter      peft_type LORA, qlora_ext_method "lora_fa"
    "vera"        VeRAAdapter        peft_type VERA, save_projection false
    "delta_lora"  DeltaLoRAAdapter   peft_type LORA, qlora_ext_method "delta_lora"
LoRA+ is not an adapter but optimizer groups: `qlora_ext.loraplus_param_groups`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adapters import Adapter, LoRAAdapter
from .delta_lora import DeltaLoRAAdapter, check_delta_lambda
from .dora import DoRAAdapter
from .lora_fa import LoRAFAAdapter
from .vera import VeRAAdapter

METHODS: dict[str, type[Adapter]] = {
    "lora": LoRAAdapter,
    "dora": DoRAAdapter,
    "lora_fa": LoRAFAAdapter,
    "vera": VeRAAdapter,
    "delta_lora": DeltaLoRAAdapter,
}

#: method-specific options of prepare(), and the method each belongs to
METHOD_OPTIONS = {"vera_prng_key": "vera", "vera_d_initial": "vera", "delta_lambda": "delta_lora"}


def check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return method


def adapter_factory(
    method: str,
    layers: list,
    *,
    r: int,
    alpha: float,
    dropout: float,
    rslora: bool,
    dtype: torch.dtype,
    options: dict,
) -> Callable[[object], Adapter]:
    """A function QLoRALinear -> fresh Adapter of `method` for that layer (on its device, in
    `dtype`). `layers` are all the layers that will get one (VeRA sizes its shared pair by them).
    `options`: prepare()'s method-specific arguments that were given (not None)."""
    check_method(method)
    for name in options:
        if METHOD_OPTIONS[name] != method:
            raise ValueError(f"{name} applies only to method={METHOD_OPTIONS[name]!r}, not {method!r}")

    if method == "vera":
        if rslora:
            raise ValueError("rslora applies to LoRA scaling; VeRA has no alpha/r scale")
        shape = (max(m.out_features for m in layers), max(m.in_features for m in layers))
        prng_key, d_initial = options.get("vera_prng_key", 0), options.get("vera_d_initial", 0.1)
        VeRAAdapter(1, 1, r, prng_key, None, d_initial, dropout)  # validate the options before any layer changes
        return lambda m: VeRAAdapter(m.in_features, m.out_features, r, prng_key, shape, d_initial, dropout,
                                     device=m.weight.device, dtype=dtype)  # fmt: skip

    if method == "delta_lora":
        if dropout:
            raise ValueError(f"Delta-LoRA removes dropout from the low-rank path (paper §3); got dropout={dropout!r}")
        lam = check_delta_lambda(options.get("delta_lambda", 2.0))
        return lambda m: DeltaLoRAAdapter(m.in_features, m.out_features, r, alpha, rslora, lam,
                                          device=m.weight.device, dtype=dtype)  # fmt: skip

    cls = METHODS[method]

    def make(m) -> Adapter:
        adapter = cls(m.in_features, m.out_features, r, alpha, dropout, rslora, device=m.weight.device, dtype=dtype)
        if isinstance(adapter, DoRAAdapter):
            adapter.init_magnitude(m)
        return adapter

    return make


def adapter_class(config: dict) -> type[Adapter]:
    """The Adapter class for adapter_config.json `config`; ValueError if unsupported."""
    peft_type = config.get("peft_type")
    if peft_type == "VERA":
        return VeRAAdapter
    if peft_type != "LORA":
        raise ValueError(f"peft_type {peft_type!r} is not supported (supported: ['LORA', 'VERA'])")
    method = config.get("qlora_ext_method", "lora")
    if method not in ("lora", "lora_fa", "delta_lora"):
        raise ValueError(f"qlora_ext_method {method!r} is not supported (supported: ['delta_lora', 'lora', 'lora_fa'])")
    if config.get("use_dora"):
        if method != "lora":
            raise ValueError(f"use_dora=true cannot be combined with qlora_ext_method {method!r}")
        return DoRAAdapter
    return METHODS[method]
