"""`load_bnb_4bit`: load a pre-quantized `*-bnb-4bit` transformers checkpoint straight into
QLoRALinear layers, bit for bit, without ever forming its float weights.

The model is built from config.json with its parameters on the `meta` device (buffers such as
rotary tables stay real: they are computed, not loaded); each quantized layer is read from the
safetensors shards into an NF4Weight and swapped in; the remaining tensors (embeddings, norms,
an unquantized lm_head) are assigned as stored.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from .io_utils import read_json
from .layers import QLoRALinear, is_conv1d
from .nf4 import NF4Weight

QUANT_STATE_SUFFIXES = (".weight.quant_state.bitsandbytes__nf4", ".weight.quant_state.bitsandbytes__fp4")


@contextlib.contextmanager
def parameters_on_meta():
    """Within the block, every parameter registered on a module moves to the meta device.

    Constructors still run (cheaply: the float storage they allocate is freed at once and their
    init runs on meta), so buffers computed in __init__ (rotary inv_freq) are real. Patches
    nn.Module.register_parameter for the duration: not thread-safe.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Tensor key -> the safetensors file holding it (single file or sharded with an index)."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing 'weight_map'")
        return {k: directory / v for k, v in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    except Exception as exc:
        raise ValueError(f"{single}: not a valid safetensors file: {exc}") from None


class _Reader:
    """Lazy tensor reads across shards, each opened once (memory-mapped by safetensors)."""

    def __init__(self, files: dict[str, Path], device, stack: contextlib.ExitStack):
        from safetensors import safe_open

        self.files, self.device, self._open, self._stack, self._safe_open = files, device, {}, stack, safe_open

    def get(self, key: str) -> torch.Tensor:
        path = self.files[key]
        try:
            if path not in self._open:
                self._open[path] = self._stack.enter_context(self._safe_open(str(path), framework="pt", device=str(self.device)))
            return self._open[path].get_tensor(key)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read tensor {key!r}: {exc}") from None


def _quantized_layer_paths(keys) -> list[str]:
    return sorted(k[: -len(s)] for k in keys for s in QUANT_STATE_SUFFIXES if k.endswith(s))


def _swap_in_quantized(model: nn.Module, path: str, reader: _Reader, compute_dtype) -> set[str]:
    """Replace the float layer `path` with a QLoRALinear read from the checkpoint; returns the keys used."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"checkpoint holds quantized weight {path}.weight, but the model built from config.json has no layer {path!r}") from None
    keys = {k for k in reader.files if k == f"{path}.weight" or k.startswith(f"{path}.weight.")}
    sd = {k: reader.get(k) for k in keys}
    weight = NF4Weight.from_state_dict(sd, f"{path}.weight")
    conv1d = is_conv1d(module)
    if not (isinstance(module, nn.Linear) or conv1d):
        raise ValueError(f"{path}: quantized in the checkpoint but a {type(module).__name__} in the model")
    expected = (module.weight.shape[1], module.weight.shape[0]) if conv1d else tuple(module.weight.shape)
    if tuple(weight.shape) != expected:
        raise ValueError(f"{path}.weight: checkpoint shape {tuple(weight.shape)}, the model expects {expected}")
    bias = None
    if f"{path}.bias" in reader.files:
        bias = reader.get(f"{path}.bias")
        keys.add(f"{path}.bias")
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, QLoRALinear(weight, bias, compute_dtype, conv1d))
    return keys


def load_bnb_4bit(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """A transformers causal LM from a bitsandbytes NF4 checkpoint (config.json + safetensors).

    Quantized layers become QLoRALinear (bit-exact: same codes and scales), with no adapter yet:
    call `qlora_ext.prepare(model, ...)` to add one. Other tensors are loaded as stored, on
    `device`. `dtype` overrides the config's dtype for the modules built from it. Any key of the
    checkpoint the model lacks, or parameter the checkpoint lacks, is a ValueError.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    files = checkpoint_files(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model built here is ours, not a bitsandbytes one
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))

    with contextlib.ExitStack() as stack:
        reader = _Reader(files, device, stack)
        used = set()
        for path in _quantized_layer_paths(files):
            used |= _swap_in_quantized(model, path, reader, compute_dtype)
        rest = {k: reader.get(k) for k in files if k not in used}
        result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        key = result.unexpected_keys[0]
        raise ValueError(f"{files[key]}: key {key!r} matches nothing in the model built from config.json")
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ValueError(f"{directory}: the checkpoint has no tensor for parameter {still_meta[0]!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)
