"""qlora_ext: QLoRA fine-tuning on one small GPU.

Public API (DESIGN.md §6): NF4Weight; the operators in `qlora_ext.ops`; `build_info()`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _ops as ops  # noqa: E402
from ._native import build_info, native  # noqa: E402
from .nf4 import NF4Weight  # noqa: E402
from . import optim  # noqa: E402
from .optim import PagedAdamW  # noqa: E402

try:
    native()
    ops.register_fakes()
    optim.ops.register_fakes()
except ImportError:
    # Importable without the compiled extension; operators raise a clear ImportError on use.
    pass

__all__ = ["NF4Weight", "ops", "build_info"]
__all__ += ["PagedAdamW", "optim"]
