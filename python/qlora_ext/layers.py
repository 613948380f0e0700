"""`QLoRALinear`: a linear layer with a frozen NF4 base weight and named, switchable adapters.

The base weight is an `NF4Weight` (not a Parameter: it is never trained and must not be cast by
`model.half()`); it moves with `.to(device)`/`.cuda()`, and appears in the module's state_dict
under bitsandbytes' keys (`weight`, `weight.absmax`, …, DESIGN.md §3), so `model.state_dict()`
round-trips and reads like a bnb-4bit checkpoint. Adapters live in `self.adapters[name]`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import _ops
from .adapters import Adapter, LoRAAdapter
from .lora_linear import nf4_linear
from .nf4 import NF4Weight


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers `Conv1D`: a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class QLoRALinear(nn.Module):
    """y = x·deq(W)ᵀ (+ bias) + the active adapter's update.

    x [..., in] -> y [..., out]. W [out, in] is NF4; `bias` [out] is a frozen Parameter.
    `compute_dtype` (optional) casts x for the computation and the result back to x's dtype.
    `fan_in_fan_out` records that the layer came from a GPT-2 `Conv1D` (weight [in, out] there),
    so that an export writes the weight in the original orientation.
    """

    def __init__(
        self,
        weight: NF4Weight,
        bias: Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        fan_in_fan_out: bool = False,
    ):
        super().__init__()
        if not isinstance(weight, NF4Weight) or len(weight.shape) != 2:
            raise TypeError("weight must be a 2-D NF4Weight [out, in]")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.compute_dtype = compute_dtype
        self.fan_in_fan_out = fan_in_fan_out
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapters_enabled = True
        self.merged = False

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> "QLoRALinear":
        """Quantize an nn.Linear (or GPT-2 Conv1D) on its weight's device; the bias is kept as is."""
        fan_in_fan_out = is_conv1d(linear)
        w = linear.weight.detach()
        if fan_in_fan_out:
            w = w.t().contiguous()  # Conv1D stores [in, out]; NF4 blocks follow the [out, in] layout
        q = NF4Weight.from_float(w, blocksize=blocksize, double_quant=double_quant)
        return cls(q, getattr(linear, "bias", None), compute_dtype, fan_in_fan_out)

    # ---- adapters --------------------------------------------------------------------------------

    def add_adapter(
        self,
        name: str,
        adapter: Adapter | None = None,
        *,
        r: int = 16,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> Adapter:
        """Add `adapter`, or a new LoRA adapter (r, alpha, dropout, rslora) in `dtype` on the
        weight's device. The first adapter added becomes the active one."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if adapter is None:
            adapter = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout, rslora,
                                  device=self.weight.device, dtype=dtype)  # fmt: skip
        elif not isinstance(adapter, Adapter):
            raise TypeError(f"adapter must be an Adapter, got {type(adapter).__name__}")
        self.adapters[name] = adapter
        if self.active_adapter is None:
            self.active_adapter = name
        return adapter

    def set_adapter(self, name: str | None) -> None:
        """Make `name` the adapter used by forward (None: base layer only)."""
        if name is not None and name not in self.adapters:
            raise ValueError(f"no adapter {name!r}; this layer has {list(self.adapters)}")
        if self.merged:
            raise RuntimeError("unmerge() before switching adapters")
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"no adapter {name!r}; this layer has {list(self.adapters)}")
        if self.merged and name == self.active_adapter:
            raise RuntimeError("unmerge() before deleting the merged adapter")
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def disable_adapters(self) -> None:
        self.adapters_enabled = False

    def enable_adapters(self) -> None:
        self.adapters_enabled = True

    @property
    def lora_A(self) -> dict[str, nn.Linear]:
        """PEFT-style view: adapter name -> its `lora_A` (nn.Linear, weight [r, in])."""
        return {n: a.lora_A for n, a in self.adapters.items() if isinstance(a, LoRAAdapter)}

    @property
    def lora_B(self) -> dict[str, nn.Linear]:
        """PEFT-style view: adapter name -> its `lora_B` (nn.Linear, weight [out, r])."""
        return {n: a.lora_B for n, a in self.adapters.items() if isinstance(a, LoRAAdapter)}

    def current_adapter(self) -> Adapter | None:
        """The adapter forward applies, or None (disabled, merged, or none set)."""
        if not self.adapters_enabled or self.merged or self.active_adapter is None:
            return None
        return self.adapters[self.active_adapter]

    # ---- merge ---------------------------------------------------------------------------------

    def dense_weight(self, adapter: str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """deq(W) + ΔW of `adapter` (None: no adapter) as a dense [out, in] tensor.

        A merged layer's W already holds its active adapter, which is then not added again.
        """
        w = self.weight.dequantize(torch.float32)
        if adapter is not None and not (self.merged and adapter == self.active_adapter):
            w = self.adapters[adapter].merged_weight(w)
        return w.to(dtype)

    def merge(self) -> None:
        """Fold the active adapter into the NF4 base: W ← NF4(deq(W) + ΔW) (DoRA: its rescaled W').

        LOSSY: the sum is re-quantized to 4 bits, so most of a small ΔW is rounded away (as in
        PEFT's 4-bit merge). For a faithful merged model use `qlora_ext.merge_and_export`, which
        writes deq(W) + ΔW densely. `unmerge()` subtracts ΔW with a second rounding.
        """
        self._requantize(+1)

    def unmerge(self) -> None:
        """Undo `merge()` (approximately: see merge)."""
        self._requantize(-1)

    def _requantize(self, sign: int) -> None:
        if (sign > 0) == self.merged:
            raise RuntimeError("already merged" if self.merged else "not merged")
        if self.active_adapter is None:
            raise RuntimeError("no active adapter to merge")
        adapter, w = self.adapters[self.active_adapter], self.weight.dequantize(torch.float32)
        dense = (adapter.merged_weight(w) if sign > 0 else adapter.unmerged_weight(w)).to(self.weight.dtype)
        self.weight = NF4Weight.from_float(dense, self.weight.blocksize, self.weight.nested is not None)
        self.merged = sign > 0

    # ---- forward -----------------------------------------------------------------------------

    def base_forward(self, x: Tensor) -> Tensor:
        """x·deq(W)ᵀ (+ bias) with no adapter."""
        return nf4_linear(x, self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        adapter = self.current_adapter()
        y = self.base_forward(x) if adapter is None else adapter.forward_with_base(self, x)
        return y.to(in_dtype)

    # ---- device moves and state dict ---------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Parameters and buffers follow `fn`; the NF4 weight follows only its device change (a
        # dtype cast such as model.half() must not touch codes or fp32 scales). `fn` applied to an
        # empty probe tells the target device whatever `fn` is (.to, .cuda, .cpu, ...).
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=self.weight.device))
        if probe.device != self.weight.device:
            self.weight = self.weight.to(probe.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self.weight.state_dict(prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip
        key = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in mine]
        if not mine:
            missing_keys.append(key)
            return
        try:
            q = NF4Weight.from_state_dict(mine, key)
        except ValueError as exc:
            error_msgs.append(str(exc))
            return
        if q.shape != self.weight.shape:
            error_msgs.append(f"{key}: shape {tuple(q.shape)} does not match the layer's {tuple(self.weight.shape)}")
            return
        self.weight = q.to(self.weight.device)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={self.weight!r}, active_adapter={self.active_adapter!r}"
        )


# ---- several layers on one input -----------------------------------------------------------------

#: Switch for `project_together` (off: every layer launches its own GEMV), for A/B measurements
#: (bench_decode.py --grouped-ab) and as a way out should a model misbehave with it.
GROUPED_GEMV_ENABLED = True


def project_together(layers: Sequence[nn.Module], x: Tensor) -> list[Tensor] | None:
    """[layer(x) for layer in layers] with one `nf4_gemv_grouped` call, or None where that call
    would not compute exactly what the layers do (the caller then calls them).

    For decode-sized inference on the projections that share an input (q, k, v; gate, up): one
    launch instead of several, so that the small ones (k and v have a quarter of q's rows in
    Llama 3) share the GPU instead of each leaving most of it idle. It applies when every layer is
    a QLoRALinear whose forward is its NF4 base alone (no adapter active, or merged), in x's
    dtype, with no forward hooks, on the fused GEMV route (`_ops.linear_route`: CUDA, fp16/bf16,
    <= 16 rows, nothing needing a gradient), and the weights can share a launch
    (`_ops.grouped_gemv_compatible`, checked once per set of weights). The outputs are views of
    one [..., sum(out_features)] tensor.
    """
    if not GROUPED_GEMV_ENABLED:
        return None
    weights = _grouped_weights(layers, x, "project_together")
    if weights is None:
        return None
    bias = _stacked_bias(layers[0], layers, x)
    y = _ops.nf4_gemv_grouped_weights(x, weights, bias)
    return list(y.split([int(w.shape[0]) for w in weights], dim=-1))


def _grouped_weights(layers: Sequence[nn.Module], x: Tensor, caller: str) -> list[NF4Weight] | None:
    """The layers' NF4 weights where one grouped GEMV computes exactly what the layers do (see
    project_together), else None."""
    if len(layers) < 2 or not all(type(layer) is QLoRALinear for layer in layers):
        return None
    if _global_forward_hooks_present():
        return None
    for layer in layers:
        if layer.current_adapter() is not None or layer.compute_dtype not in (None, x.dtype):
            return None
        if layer._forward_hooks or layer._forward_pre_hooks:
            return None
        if _ops.linear_route(x, layer.weight, layer.bias, caller=caller) != _ops.ROUTE_GEMV:
            return None
    weights = [layer.weight for layer in layers]
    return weights if _weights_share_a_launch(layers[0], weights) else None


#: Switch for `project_swiglu` (off: project_together, then block_ops.swiglu).
SWIGLU_IN_GEMV_ENABLED = True


def project_swiglu(gate_proj: nn.Module, up_proj: nn.Module, x: Tensor) -> Tensor | None:
    """silu(gate_proj(x)) * up_proj(x) with one `nf4_gemv_swiglu` call, or None where that call
    would not compute exactly what project_together and block_ops.swiglu do (the caller then does).

    Decoding's MLP: the SwiGLU runs in the grouped GEMV's epilogue, one kernel and the [..., 2N]
    gate/up round trip fewer a layer; the same bits as the two steps. It applies where
    project_together does, with gate and up of one shape, and (it has no use for training) where
    no gradient is needed: x not requiring one, or grad mode off."""
    if not (SWIGLU_IN_GEMV_ENABLED and GROUPED_GEMV_ENABLED):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    weights = _grouped_weights((gate_proj, up_proj), x, "project_swiglu")
    if weights is None or tuple(weights[0].shape) != tuple(weights[1].shape):
        return None
    bias = _stacked_bias(gate_proj, (gate_proj, up_proj), x)
    return _ops.nf4_gemv_swiglu_weights(x, weights[0], weights[1], bias)


#: Switch for `project_add` (off: the layer's output, then a separate add).
RESIDUAL_IN_GEMV_ENABLED = True


def project_add(layer: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    """layer(x) + residual; for one row (decoding at batch 1) in one nf4_gemv launch where it applies.

    A decoder layer adds its input to the attention's o_proj and the MLP's down_proj outputs; at
    one row the residual [1, N] is a bias vector, so `nf4_gemv` with it as the bias does the add
    in its epilogue, with no kernel of its own. The sum is then formed in fp32 and rounded once,
    where layer(x) + residual rounds the product first (within one rounding of each other). It
    applies where `project_together` would (a QLoRALinear whose forward is its NF4 base alone, in
    x's dtype, no hooks, the GEMV route), without a bias of the layer's own, and with the residual
    in x's dtype needing no gradient; elsewhere this is exactly layer(x) + residual."""
    rows = math.prod(x.shape[:-1])
    fusable = (
        RESIDUAL_IN_GEMV_ENABLED and type(layer) is QLoRALinear and rows == 1 and layer.bias is None
        and residual.dtype == x.dtype and residual.numel() == layer.out_features and residual.is_contiguous()
        and not (torch.is_grad_enabled() and residual.requires_grad)
        and layer.current_adapter() is None and layer.compute_dtype in (None, x.dtype)
        and not layer._forward_hooks and not layer._forward_pre_hooks and not _global_forward_hooks_present()
    )  # fmt: skip
    if fusable and _ops.linear_route(x, layer.weight, None, caller="project_add") == _ops.ROUTE_GEMV:
        return _ops.nf4_gemv_weight(x, layer.weight, residual.reshape(-1)).view(residual.shape)
    return layer(x) + residual


def _stacked_bias(owner: nn.Module, layers: Sequence[nn.Module], x: Tensor) -> Tensor | None:
    """The layers' biases side by side (zeros for a layer without one), or None if none has one;
    remembered on `owner` for these bias tensors at their current versions, so that decoding
    (Qwen2's q/k/v biases) does not concatenate them again every step."""
    biases = [layer.bias for layer in layers]
    if all(b is None for b in biases):
        return None
    versions = tuple(None if b is None else b._version for b in biases)
    cached = getattr(owner, "_qlora_stacked_bias", None)  # (weak references to the biases, versions, stacked)
    if (cached is not None and cached[1] == versions and cached[2].dtype == x.dtype and cached[2].device == x.device
            and all((r is None and b is None) or (r is not None and r() is b) for r, b in zip(cached[0], biases))):  # fmt: skip
        return cached[2]
    stacked = torch.cat([b if b is not None else x.new_zeros(layer.out_features) for b, layer in zip(biases, layers)])
    stacked = stacked.detach()  # (the GEMV route runs only where no gradient is needed)
    owner._qlora_stacked_bias = (tuple(None if b is None else weakref.ref(b) for b in biases), versions, stacked)
    return stacked


def _global_forward_hooks_present() -> bool:
    from torch.nn.modules import module as module_globals

    return bool(module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


def _weights_share_a_launch(owner: nn.Module, weights: list[NF4Weight]) -> bool:
    """`_ops.grouped_gemv_compatible(weights)`, remembered on `owner` for these very weight objects
    (a merge or a device move replaces them). The check compares nested maps by value, a device
    sync: never inside a CUDA graph capture (decoding captures after eager warm-up steps, which
    fill this cache first; a capture with an empty cache keeps the layers separate)."""
    cached = getattr(owner, "_qlora_grouped_gemv", None)  # (weak references to the weights, result)
    if cached is not None and len(cached[0]) == len(weights) and all(r() is w for r, w in zip(cached[0], weights)):
        return cached[1]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    compatible = _ops.grouped_gemv_compatible(weights)
    owner._qlora_grouped_gemv = (tuple(weakref.ref(w) for w in weights), compatible)
    return compatible
