"""qlora_ext: QLoRA fine-tuning on one small GPU.

Public API (DESIGN.md §6): NF4Weight; the operators in `qlora_ext.ops`; `build_info()`;
training: prepare, QLoRALinear, save_adapter, load_adapter, merge_and_export, load_bnb_4bit;
optimizer: PagedAdamW (and `qlora_ext.optim`).
inference: generate (static KV cache, CUDA graphs; generation.py).
LoRA family (prepare(method=...)): DoRAAdapter, LoRAFAAdapter, VeRAAdapter, DeltaLoRAAdapter (+
DeltaLoRAUpdater); LoRA+ optimizer groups: loraplus_param_groups.
Fused transformer-block operators (RMSNorm, RoPE, SwiGLU): `qlora_ext.block_ops`, wired into
Llama-family models by enable_fused_block_ops (prepare() does it).
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _ops as ops  # noqa: E402
from ._native import build_info, native  # noqa: E402
from .nf4 import NF4Weight  # noqa: E402
from . import block_ops  # noqa: E402
from . import optim  # noqa: E402
from .optim import PagedAdamW  # noqa: E402
from .lora_linear import nf4_linear, nf4_lora_linear  # noqa: E402
from .adapters import Adapter, LoRAAdapter  # noqa: E402
from .layers import QLoRALinear  # noqa: E402
from .dora import DoRAAdapter, nf4_dora_linear  # noqa: E402
from .lora_fa import LoRAFAAdapter  # noqa: E402
from .vera import VeRAAdapter  # noqa: E402
from .delta_lora import DeltaLoRAAdapter, DeltaLoRAUpdater  # noqa: E402
from .methods import METHODS  # noqa: E402
from .loraplus import loraplus_param_groups  # noqa: E402
from .prepare import prepare, print_trainable_parameters, set_adapter  # noqa: E402
from .adapters_io import load_adapter, merge_and_export, merged_state_dict, save_adapter  # noqa: E402
from .checkpoint import load_bnb_4bit  # noqa: E402
from .fused_blocks import disable_fused_block_ops, enable_fused_block_ops  # noqa: E402
from .generation import generate  # noqa: E402

try:
    native()
    ops.register_fakes()
    block_ops.register_fakes()
    optim.ops.register_fakes()
    ops.apply_gemv_variant_from_env()
except ImportError:
    # Importable without the compiled extension; operators raise a clear ImportError on use.
    pass

__all__ = [
    "NF4Weight", "ops", "build_info", "PagedAdamW", "optim",
    "prepare", "QLoRALinear", "Adapter", "LoRAAdapter", "save_adapter", "load_adapter",
    "merge_and_export", "merged_state_dict", "load_bnb_4bit", "set_adapter", "print_trainable_parameters",
    "nf4_linear", "nf4_lora_linear",
    "DoRAAdapter", "LoRAFAAdapter", "VeRAAdapter", "DeltaLoRAAdapter", "DeltaLoRAUpdater", "METHODS",
    "loraplus_param_groups", "nf4_dora_linear", "block_ops", "enable_fused_block_ops", "disable_fused_block_ops", "generate",
]  # fmt: skip
