"""`prepare(model)`: turn a float model into a QLoRA-trainable one, in place.

Each target linear layer is quantized to NF4 on its own device and swapped for a `QLoRALinear`
with an adapter (LoRA or a variant: methods.py); the float weight is released right after, so peak memory is about the final
model plus one float layer. Everything except the adapters is frozen; nothing is upcast (norms and
embeddings stay in the model's dtype: PEFT's fp32 upcast costs memory for little gain).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from . import checkpointing
from .fused_blocks import enable_fused_block_ops
from .fused_loss import enable_fused_loss
from .fused_mlp import enable_fused_mlp
from .fused_qkv import enable_fused_qkv, is_fused_qkv
from .generation import generate_in_eval_mode
from .layers import QLoRALinear, is_conv1d
from .methods import adapter_factory, check_method
from .nf4 import NF4Weight
from .oom import explain_oom

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("lm_head", "output")  # output-head names excluded by "all-linear" in plain modules


def _is_bnb_linear4bit(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Linear4bit" and hasattr(weight, "quant_state")


def _is_linear(module: nn.Module) -> bool:
    """Layers prepare() can target: nn.Linear (incl. bnb Linear4bit), GPT-2 Conv1D, QLoRALinear."""
    return isinstance(module, (nn.Linear, QLoRALinear)) or is_conv1d(module)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module, for every targetable linear layer (first name of shared ones)."""
    seen, found = set(), {}
    for name, module in model.named_modules():
        if name and _is_linear(module) and id(module) not in seen:
            seen.add(id(module))
            found[name] = module
    return found


def _output_head_names(model: nn.Module, linears: dict[str, nn.Module]) -> set[str]:
    """Names of the LM head: the output embedding, a linear tied to an input embedding, or (for
    plain modules without get_output_embeddings) a linear named `lm_head`/`output`."""
    heads = {n for n in linears if n.rsplit(".", 1)[-1] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in linears.items():
        if module is out or id(getattr(module, "weight", None)) in embedding_weights:
            heads.add(name)
    return heads


def select_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Qualified names of the layers to quantize and adapt.

    "all-linear": every linear layer but the LM head. Another string: a regex that must match the
    full qualified name (as in PEFT). A list: names matched as the full name or a dotted suffix
    (`q_proj` matches `model.layers.0.self_attn.q_proj`); an entry matching nothing is an error.
    """
    linears = linear_layers(model)
    if isinstance(target_modules, str):
        if target_modules == ALL_LINEAR:
            heads = _output_head_names(model, linears)
            chosen = [n for n in linears if n not in heads]
        else:
            chosen = [n for n in linears if re.fullmatch(target_modules, n)]
            if not chosen:
                raise ValueError(f"target_modules regex {target_modules!r} matches no linear layer; {_available(linears)}")
        if not chosen:
            raise ValueError(f"the model has no linear layers to adapt besides the LM head; {_available(linears)}")
        return chosen
    if not isinstance(target_modules, Iterable) or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be 'all-linear', a regex string or a list of names, got {target_modules!r}")
    targets = list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty")
    unknown = [t for t in targets if not any(_matches(n, t) for n in linears)]
    if unknown:
        raise ValueError(f"target_modules {unknown} match no linear layer of the model; {_available(linears)}")
    return [n for n in linears if any(_matches(n, t) for t in targets)]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _available(linears: dict[str, nn.Module]) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
    return f"linear layers present (by last name): {suffixes}" if suffixes else "the model has no linear layers"


def _to_qlora(module: nn.Module, blocksize: int, double_quant: bool, compute_dtype) -> QLoRALinear:
    if isinstance(module, QLoRALinear):
        return module  # already quantized (a second adapter, or a bnb-4bit checkpoint we loaded)
    if _is_bnb_linear4bit(module):
        # bitsandbytes writes exactly our format: read its state dict, no dequantize/requantize.
        sd = {k: v for k, v in module.state_dict().items() if k.startswith("weight")}
        return QLoRALinear(NF4Weight.from_state_dict(sd, "weight"), module.bias, compute_dtype)
    return QLoRALinear.from_linear(module, blocksize, double_quant, compute_dtype)


class _LayerShape(NamedTuple):
    in_features: int
    out_features: int


def _in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a targetable layer, before quantization."""
    if isinstance(module, QLoRALinear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores [in, out]
    return module.in_features, module.out_features


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; NF4 base weights count by their logical size."""
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    total += sum(m.weight.numel for m in model.modules() if isinstance(m, QLoRALinear))
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")


def _check_float_weights(linears: dict[str, nn.Module], names: list[str]) -> None:
    for name in names:
        m = linears[name]
        if isinstance(m, QLoRALinear) or _is_bnb_linear4bit(m):
            continue
        if not m.weight.is_floating_point():
            raise TypeError(f"{name}.weight has dtype {m.weight.dtype}; prepare() needs a float model (fp32/fp16/bf16)")
        if m.weight.device.type == "meta":
            raise ValueError(f"{name}.weight is on the meta device; load the weights first (or use load_bnb_4bit)")


def enable_gradient_checkpointing(model: nn.Module, offload: bool | None = False) -> bool:
    """Per-layer checkpointing where the model supports it: transformers models get
    qlora_ext.checkpointing's one-node-per-layer checkpoint (far less host time than
    torch.utils.checkpoint's per-tensor hooks), with the saved layer inputs in pinned host memory
    if `offload` (None: where the model allows it); other modules with `gradient_checkpointing_enable`
    get their own, non-reentrant (offload=True is an error for them). Returns whether it was enabled."""
    if not getattr(model, "supports_gradient_checkpointing", True):
        if offload:
            raise ValueError("offload_checkpoints: this model does not support gradient checkpointing")
        return False
    if checkpointing.enable(model, offload=offload is not False):
        return True
    if offload:
        raise ValueError("offload_checkpoints needs a transformers model (per-layer checkpointing hooks); "
                         f"{type(model).__name__} has none")
    kwargs = {"use_reentrant": False}
    # transformers >= 5.2x renamed the method (the old name warns); older ones only have the old name.
    if callable(getattr(model, "activation_checkpointing_enable", None)):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        return False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    return True


def prepare(
    model: nn.Module,
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    rslora: bool = False,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = True,
    adapter_name: str = "default",
    adapter_dtype: torch.dtype = torch.float32,
    verbose: bool = True,
    method: str = "lora",
    vera_prng_key: int | None = None,
    vera_d_initial: float | None = None,
    delta_lambda: float | None = None,
    fused_loss: bool = True,
    fused_block_ops: bool = True,
    fused_mlp: bool = True,
    fused_qkv: bool | None = None,
    offload_checkpoints: bool | None = None,
) -> nn.Module:
    """Quantize the target linear layers of `model` to NF4 and add an adapter to each; in place.

    method: the LoRA-family variant (qlora_ext/methods.py): "lora" (default), "dora", "lora_fa"
    (A frozen), "vera" (shared random projections, trained vectors), "delta_lora" (the base moves
    by λ·Δ(B·A); call `DeltaLoRAUpdater(model).step()` after each optimizer step).
    r, alpha, dropout, rslora: rank, alpha (scale alpha/r, or alpha/√r with rslora), dropout
    (VeRA: r and dropout only; Delta-LoRA: no dropout).
    vera_prng_key (default 0), vera_d_initial (default 0.1): VeRA's projection seed and d init.
    delta_lambda (default 2.0): Delta-LoRA's update ratio λ. Each is an error with another method.
    target_modules: "all-linear" (all but the LM head), a regex, or a list of name suffixes.
    blocksize, double_quant: NF4 format (DESIGN.md §3). compute_dtype: dtype of the layer math
    (default: the input's). adapter_dtype: dtype of the LoRA parameters (fp32 as PEFT does).
    Layers already quantized (a prepared model, a bnb-4bit model) just get the new adapter, so
    calling prepare twice with another adapter_name adds a second adapter.
    fused_loss: for Llama/Mistral/Qwen2-family causal LMs, compute the training loss
    (`model(..., labels=...)` with gradients enabled) by cross-entropy fused with the LM head and
    chunked over tokens (fused_loss.py): the full logits never exist; `logits` is None then.
    fused_block_ops: for Llama/Mistral/Qwen2/Qwen3 models and the builtin TinyLlama, run RMSNorm,
    RoPE and the SwiGLU activation as fused operators (fused_blocks.py) on CUDA inputs.
    fused_mlp: run each SwiGLU MLP whose projections carry a plain LoRA or a DoRA adapter as one
    autograd unit that keeps two [tokens, intermediate] activations for backward instead of four
    (five for DoRA) and costs far less host time (fused_mlp.py); other adapters and dropout fall
    back to the modules (and fused_block_ops' SwiGLU) at call time.
    fused_qkv: compute each Llama-family attention's q, k and v projections (transformers' Llama,
    Mistral, Qwen2, Qwen3; the builtin TinyLlama) as one autograd unit when all three carry a
    plain LoRA adapter (or all three DoRA, on fused_qkv.DORA_DEVICES: the CPU and CUDA): x read
    and saved once, one GEMM on the three dequantized weights, one autograd node instead of
    three (fused_qkv.py). None (the default): wherever it applies; True
    insists (an error if no attention module's q/k/v were adapted); False keeps the modules. At
    call time other adapters, dropout in training, disabled/merged adapters, torch.compile and
    the fused 4-bit inference kernels' cases fall back to the modules.
    offload_checkpoints: keep each checkpointed layer's input in pinned host memory instead of on
    the GPU, copied on a side stream and prefetched for backward (checkpointing.py). None (the
    default): wherever it applies, i.e. transformers models with gradient_checkpointing (CUDA
    tensors only; it measured no slower on the H100, README "Offloaded checkpoints"); True insists
    (an error where it cannot apply); False keeps them on the GPU.
    transformers' `model.generate(...)` is made to run in eval mode (generation.generate_in_eval_mode:
    checkpointed layers drop the KV cache in training mode); `qlora_ext.generate` is the faster path.
    Returns `model`, with only adapter parameters trainable; prints the trainable-parameter line.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r (the LoRA rank) must be a positive int, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not adapter_dtype.is_floating_point:
        raise TypeError(f"adapter_dtype must be a float dtype, got {adapter_dtype}")
    check_method(method)
    if offload_checkpoints and not gradient_checkpointing:
        raise ValueError("offload_checkpoints=True needs gradient_checkpointing=True (it offloads the checkpoints)")
    options = {k: v for k, v in (("vera_prng_key", vera_prng_key), ("vera_d_initial", vera_d_initial),
                                 ("delta_lambda", delta_lambda)) if v is not None}  # fmt: skip
    linears = linear_layers(model)
    names = select_targets(model, target_modules)
    _check_float_weights(linears, names)
    for name in names:
        if adapter_name in getattr(linears[name], "adapters", {}):
            raise ValueError(f"{name} already has an adapter named {adapter_name!r}")
    shapes = [_LayerShape(*_in_out(linears[n])) for n in names]
    make_adapter = adapter_factory(method, shapes, r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                                   dtype=adapter_dtype, options=options)  # fmt: skip

    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        # (the shape only: a reference to the float weight here would keep it alive a layer longer)
        doing = f"quantizing {name} {list(getattr(linears[name].weight, 'shape', ()))} to NF4 on its device"
        with explain_oom(doing, "prepare() quantizes layer by layer on each weight's device and frees "
                                "the float weight right after, so the float model itself must fit: "
                                "load it on the CPU and move the prepared model to the GPU, or load a "
                                "*-bnb-4bit checkpoint with load_bnb_4bit"):  # fmt: skip
            layer = _to_qlora(linears[name], blocksize, double_quant, compute_dtype)
        layer.add_adapter(adapter_name, make_adapter(layer))
        layer.set_adapter(adapter_name)
        _set_submodule(model, name, layer)
        linears[name] = layer  # drops the last reference to the float layer: its weight is freed

    if gradient_checkpointing:
        enable_gradient_checkpointing(model, offload=offload_checkpoints)
    if fused_loss:
        enable_fused_loss(model)
    if fused_block_ops:
        enable_fused_block_ops(model)
    if fused_mlp:  # after the block ops: its fallback is the MLP forward they install
        enable_fused_mlp(model)
    if fused_qkv is not False:  # after the block ops too: their attention forward is its fallback
        switched = enable_fused_qkv(model)
        if fused_qkv and not switched and not any(is_fused_qkv(m) for m in model.modules()):
            raise ValueError("fused_qkv=True: no attention module of this model has q_proj, k_proj and v_proj "
                             "adapted in a structure fused_qkv knows (Llama, Mistral, Qwen2, Qwen3, the builtin "
                             "TinyLlama); pass fused_qkv=None to use it only where it applies")
    generate_in_eval_mode(model)
    if verbose:
        print_trainable_parameters(model)
    return model


def qlora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    """Qualified name -> QLoRALinear, for every quantized layer of a prepared model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter of every layer that has it (None: base model only)."""
    layers = qlora_layers(model)
    if name is not None and not any(name in m.adapters for m in layers.values()):
        raise ValueError(f"no layer has an adapter named {name!r}")
    for m in layers.values():
        m.set_adapter(name if name is None or name in m.adapters else None)
