"""Adapters on disk in PEFT's format, and merged dense exports.

Adapter directory (what PEFT's `PeftModel.from_pretrained` reads):
    adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules, ...
    adapter_model.safetensors  base_model.model.<layer path>.lora_A.weight [r, in]
                               base_model.model.<layer path>.lora_B.weight [out, r]
                               (DoRA: + .lora_magnitude_vector [out]; VeRA: .vera_lambda_b [out],
                               .vera_lambda_d [r]; see methods.py for every variant)
The per-layer key suffixes are the adapter modules' own state-dict names (see adapters.py), and
the variant-specific config fields come from the adapter class, so a new variant saves and loads
with no change here beyond its entry in methods.adapter_class.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from .adapters import Adapter
from .io_utils import atomic_save_safetensors, atomic_write_json, read_json, read_safetensors
from .layers import QLoRALinear
from .methods import adapter_class
from .prepare import linear_layers, qlora_layers, set_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# ---- saving --------------------------------------------------------------------------------------


def _layers_with(model: nn.Module, adapter_name: str) -> dict[str, QLoRALinear]:
    layers = {n: m for n, m in qlora_layers(model).items() if adapter_name in m.adapters}
    if not layers:
        raise ValueError(f"the model has no adapter named {adapter_name!r} (call qlora_ext.prepare first)")
    return layers


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT on-disk key -> tensor, for every layer holding `adapter_name`."""
    return {
        f"{PEFT_PREFIX}{path}.{key}": t.detach()
        for path, layer in _layers_with(model, adapter_name).items()
        for key, t in layer.adapters[adapter_name].state_dict().items()
    }


def _compact_targets(model: nn.Module, paths: list[str]) -> list[str]:
    """Last-name suffixes (q_proj, ...) when they select exactly `paths` among the model's linear
    layers (PEFT matches by suffix), else the full paths."""
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {n for n in linear_layers(model) if n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if selected == set(paths) else sorted(paths)


def _base_model_name(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or None


def adapter_config(model: nn.Module, adapter_name: str = "default") -> dict:
    """adapter_config.json for `adapter_name`: PEFT's baseline keys (readable by PEFT >= 0.8) plus
    the variant's own (`Adapter.peft_model_config`; LoRA: layers whose rank or alpha differ from
    the most common one go to rank_pattern/alpha_pattern).
    """
    layers = _layers_with(model, adapter_name)
    adapters = {p: m.adapters[adapter_name] for p, m in layers.items()}
    kinds = {type(a) for a in adapters.values()}
    if len(kinds) != 1:
        raise ValueError(f"adapter {adapter_name!r} mixes adapter types {sorted(k.__name__ for k in kinds)} across layers")
    cls = kinds.pop()
    variant = cls.peft_model_config({p: a.peft_config() for p, a in adapters.items()})
    is_causal_lm = type(model).__name__.endswith("ForCausalLM") or callable(getattr(model, "get_output_embeddings", None))
    return {
        "peft_type": cls.peft_type,
        "task_type": "CAUSAL_LM" if is_causal_lm else None,
        "base_model_name_or_path": _base_model_name(model),
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        **variant,
        "target_modules": _compact_targets(model, list(layers)),
        "bias": "none",
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write `adapter_name` in PEFT's format to `directory` (created if needed); returns it.

    Both files are written atomically, weights first, so a failure leaves any earlier adapter there intact.
    """
    config = adapter_config(model, adapter_name)
    tensors = {k: v.to("cpu") for k, v in adapter_state_dict(model, adapter_name).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(directory / WEIGHTS_NAME, tensors)
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


# ---- loading -------------------------------------------------------------------------------------

_NAMED_SEGMENT = re.compile(r"^(.*\.lora_[A-Za-z_]+)\.[^.]+\.(weight|bias)$")


def _normalize_key(key: str) -> str:
    """PEFT's on-disk key without the `base_model.model.` prefix and without an adapter name that
    some writers leave in (`...lora_A.default.weight` -> `...lora_A.weight`)."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX) :]
    m = _NAMED_SEGMENT.match(key)
    return f"{m.group(1)}.{m.group(2)}" if m else key


def _file_layer_paths(model: nn.Module, tensors: dict) -> dict:
    """Layer path -> one file key, for the QLoRALinear layers the file's keys belong to (the
    longest layer path that prefixes the key); a key belonging to no layer is under None."""
    layer_paths = set(qlora_layers(model))
    found = {}
    for raw_key in sorted(tensors):
        key = _normalize_key(raw_key)
        path = _layer_of(key, layer_paths)
        if path is None:
            found.setdefault(None, raw_key)
        else:
            found.setdefault(path, raw_key)
    return found


def _pattern_value(pattern: dict, path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path as a dotted suffix regex."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", path):
            return value
    return default


def _layer_config(config: dict, path: str) -> dict:
    return {
        **config,
        "r": _pattern_value(config.get("rank_pattern"), path, config.get("r")),
        "lora_alpha": _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha")),
    }


def _read_config(path: Path) -> tuple[dict, type[Adapter]]:
    config = read_json(path)
    try:
        cls = adapter_class(config)
        if config.get("bias", "none") != "none":
            raise ValueError(f"bias={config['bias']!r} is not supported, only 'none'")
        cls.validate_peft_config(config)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return config, cls


def _target_adapters(model, config, cls, config_path, file_paths, adapter_name) -> dict[str, Adapter]:
    """Layer path -> the adapter that will receive the weights: the existing `adapter_name` of each
    layer, or (when the model has none) fresh adapters for the layers the file names."""
    layers = qlora_layers(model)
    if not layers:
        raise ValueError("the model has no QLoRALinear layers: call qlora_ext.prepare(model) first")
    existing = {p: m.adapters[adapter_name] for p, m in layers.items() if adapter_name in m.adapters}
    if existing:
        wrong = sorted({type(a).__name__ for a in existing.values() if type(a) is not cls})
        if wrong:
            raise ValueError(f"{config_path}: describes a {cls.__name__}, but the model's adapter "
                             f"{adapter_name!r} is a {wrong[0]}; load it under another adapter_name")  # fmt: skip
        return existing
    if None in file_paths:
        raise ValueError(f"{config_path.parent / WEIGHTS_NAME}: key {file_paths[None]!r}, which is not a quantized layer of this model")
    fresh = {}
    shared = cls.shared_config(config, [(layers[p].out_features, layers[p].in_features) for p in file_paths])
    for path in sorted(file_paths):
        layer = layers[path]
        # the dtype of the layer's other adapters (prepare's adapter_dtype), else PEFT's fp32
        dtype = next((p.dtype for p in layer.adapters.parameters()), torch.float32)
        fresh[path] = cls.from_peft_config(layer.in_features, layer.out_features,
                                           {**_layer_config(config, path), **shared},
                                           device=layer.weight.device, dtype=dtype)  # fmt: skip
    return fresh


def _validated_updates(weights_path, tensors, adapters) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, value) pairs after checking that keys, shapes and dtypes all match."""
    by_key = {}
    for raw_key, t in tensors.items():
        key = _normalize_key(raw_key)
        if key in by_key:
            raise ValueError(f"{weights_path}: key {raw_key!r} duplicates another key after normalisation")
        by_key[key] = (raw_key, t)
    expected = {f"{path}.{name}": p for path, a in adapters.items() for name, p in a.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(by_key))
    if missing:
        raise ValueError(f"{weights_path}: missing key {PEFT_PREFIX + missing[0]!r} ({len(missing)} missing in all)")
    extra = sorted(set(by_key) - set(expected))
    if extra:
        raise ValueError(f"{weights_path}: unexpected key {by_key[extra[0]][0]!r} ({len(extra)} unexpected in all); "
                         "is this an adapter for another model?")  # fmt: skip
    updates = []
    for key, param in expected.items():
        raw_key, t = by_key[key]
        if t.shape != param.shape:
            raise ValueError(f"{weights_path}: {raw_key!r} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(param.shape)} (another rank or architecture?)")  # fmt: skip
        if not t.is_floating_point():
            raise ValueError(f"{weights_path}: {raw_key!r} has dtype {t.dtype}, expected a float dtype")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{weights_path}: {raw_key!r} contains NaN or Inf")
        updates.append((param, t))
    return updates


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT-format adapter (ours or PEFT's: LoRA, rsLoRA, DoRA, VeRA, and our LoRA-FA and
    Delta-LoRA files) into a prepared model as `adapter_name`, and make it the active adapter of
    every layer (layers without it run the base weight alone).

    If the model already has `adapter_name`, its parameters are overwritten in place (an optimizer
    holding them stays valid) and its alpha is taken from the file; otherwise the adapter is
    created on the layers the file names. Everything (config, every key, shape and dtype) is
    checked before anything is written: on any problem a ValueError names the file and key and
    the model is unchanged.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    config, cls = _read_config(config_path)
    tensors = read_safetensors(weights_path)
    file_paths = _file_layer_paths(model, tensors)
    adapters = _target_adapters(model, config, cls, config_path, file_paths, adapter_name)
    updates = _validated_updates(weights_path, tensors, adapters)

    with torch.no_grad():
        for param, value in updates:
            param.copy_(value)
    layers = qlora_layers(model)
    shared = cls.shared_config(config, [(layers[p].out_features, layers[p].in_features) for p in adapters])
    for path, adapter in adapters.items():
        adapter.apply_peft_config({**_layer_config(config, path), **shared})
        if adapter_name not in layers[path].adapters:
            layers[path].add_adapter(adapter_name, adapter)
            adapter.mark_trainable()
    set_adapter(model, adapter_name)  # layers the file does not cover run the base alone, as in PEFT
    return model


# ---- merged export -------------------------------------------------------------------------------


def _layer_of(key: str, layer_paths: set[str]) -> str | None:
    """The QLoRALinear path that owns state-dict `key`, if any."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layer_paths:
            return prefix
    return None


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = torch.bfloat16,
                      adapter_name: str | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The model's state dict as a plain dense model's, on the CPU: each QLoRALinear becomes
    `weight` = deq(W) + ΔW of `adapter_name` (default: each layer's active adapter; "" for none)
    in the layer's original layout (GPT-2 Conv1D: [in, out]) plus its `bias`. Float tensors are
    cast to `dtype` (None: kept). Tensors shared by several keys (tied embeddings) appear once.
    """
    layers = qlora_layers(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()

    def put(key, t):
        identity = (t.device, t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and identity in seen:
            return
        seen.add(identity)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t.detach().to("cpu")

    for key, t in model.state_dict().items():
        path = _layer_of(key, set(layers))
        if path is None:
            put(key, t)
        elif key == f"{path}.weight":  # the packed codes: emit the merged dense weight in its place
            layer = layers[path]
            name = layer.active_adapter if adapter_name is None else (adapter_name or None)
            if name is not None and name not in layer.adapters:
                name = None  # this layer does not carry that adapter
            if layer.merged and name != layer.active_adapter:
                raise ValueError(f"{path}: its NF4 weight holds adapter {layer.active_adapter!r} merged; unmerge() first")
            w = layer.dense_weight(name)
            w = w.t() if layer.fan_in_fan_out else w
            out[key] = w.to(dtype or layer.weight.dtype).contiguous().to("cpu")
        elif key == f"{path}.bias":
            put(key, t)
    return out


def _export_config(model: nn.Module, dtype: torch.dtype) -> dict | None:
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        return None
    d = config.to_dict()
    d.pop("quantization_config", None)
    d.pop("_pre_quantization_dtype", None)
    d["dtype"] = str(dtype).removeprefix("torch.")
    d["use_cache"] = True  # prepare() turns it off for training
    if not d.get("architectures"):
        d["architectures"] = [type(model).__name__]
    return d


def merge_and_export(model: nn.Module, directory: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                     adapter_name: str | None = None) -> Path:  # fmt: skip
    """Write a dense merged checkpoint: `model.safetensors` (see merged_state_dict) and, for
    transformers models, `config.json` without the quantization config, so that
    `AutoModelForCausalLM.from_pretrained(directory)` loads it. The model itself is unchanged.

    The merge is exact up to `dtype`: deq(W) + s·B·A is formed in fp32 and rounded once (unlike
    QLoRALinear.merge(), which re-quantizes to NF4). Note the adapter was trained against deq(W),
    which is what this writes, not the original float W.
    """
    tensors = merged_state_dict(model, dtype, adapter_name)
    config = _export_config(model, dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(directory / "model.safetensors", tensors)
    if config is not None:
        atomic_write_json(directory / "config.json", config)
    return directory
