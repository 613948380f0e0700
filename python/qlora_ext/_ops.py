"""Python face of the torch.ops.qlora_ext operators: typed wrappers, fake (meta) kernels for
torch.compile, and input checks that need Python (schemas: cpp/torch/schemas.cpp).

The fakes compute output shapes only and never read data; they use torch._check so that a shape
error under torch.compile reads like the eager one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._native import native
from .codebooks import dynamic_map, is_library_map

NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _ops():
    native()  # loads the library that registers the operators
    return torch.ops.qlora_ext


def _ceil_div(a, b):
    return (a + b - 1) // b


# ---- wrappers -------------------------------------------------------------------------------


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize `weight` (any shape, fp32/fp16/bf16).

    Returns (packed uint8 [(n+1)//2, 1], absmax fp32 [ceil(n/blocksize)]). A block containing NaN
    gets absmax NaN and one containing inf gets absmax inf; `NF4Weight.from_float` rejects both.
    """
    return _ops().nf4_quantize(weight, blocksize)


def nf4_double_quantize(
    weight: torch.Tensor, blocksize: int = 64, nested_code: torch.Tensor | None = None, nested_blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4-quantize with double quantization in one native call.

    Returns (packed uint8 [(n+1)//2, 1], absmax codes uint8 [n_blocks], nested_absmax fp32
    [ceil(n_blocks/nested_blocksize)], offset fp32 0-d). `nested_code` defaults to the signed
    dynamic map on the weight's device.
    """
    if nested_code is None:
        nested_code = dynamic_map(signed=True, device=weight.device)
    elif not is_library_map(nested_code):
        _check_sorted(nested_code, "nested_code")
    return _ops().nf4_double_quantize(weight, blocksize, nested_code, nested_blocksize)


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """Dequantize NF4 codes to a `dtype` tensor of `shape` (see the schema for the scale forms)."""
    return _ops().nf4_dequantize(
        packed, absmax, blocksize, list(shape), dtype,
        nested_absmax, nested_code, nested_offset, nested_blocksize,
    )  # fmt: skip


def blockwise8_quantize(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantize fp32 `x` against a sorted 256-entry map: (codes uint8, absmax fp32).

    `code` must be sorted ascending; a map that is not the library's own is checked here (the
    native op checks only CPU maps, to avoid a device sync per call).
    """
    if not is_library_map(code):
        _check_sorted(code, "code")
    return _ops().blockwise8_quantize(x, code, blocksize)


def _check_sorted(code: torch.Tensor, name: str) -> None:
    # Needs data: skipped for meta tensors and while torch.compile traces (no values there).
    if not isinstance(code, torch.Tensor) or code.device.type == "meta" or torch.compiler.is_compiling():
        return
    if code.numel() > 1 and not bool((code[1:] >= code[:-1]).all()):
        raise ValueError(f"{name} must be sorted ascending")


def blockwise8_dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """fp32 `code[codes] * absmax[block]`, shaped like `codes`."""
    return _ops().blockwise8_dequantize(codes, absmax, code, blocksize)


# ---- fake kernels ---------------------------------------------------------------------------


def _check_power_of_two_blocksize(blocksize) -> None:
    torch._check(
        blocksize > 0 and blocksize & (blocksize - 1) == 0,
        lambda: f"blocksize must be a positive power of two, got {blocksize}",
    )


_fakes_registered = False


def register_fakes() -> None:
    """Registers the fake kernels once the library is loaded (called on package import)."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("qlora_ext::nf4_quantize")
    def _(weight, blocksize):
        torch._check(
            weight.dtype in (torch.float32, torch.float16, torch.bfloat16),
            lambda: f"weight must be float32, float16 or bfloat16, got {weight.dtype}",
        )
        torch._check(blocksize in NF4_BLOCKSIZES, lambda: f"blocksize must be one of {NF4_BLOCKSIZES}")
        n = weight.numel()
        packed = weight.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
        absmax = weight.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)
        return packed, absmax

    @torch.library.register_fake("qlora_ext::nf4_dequantize")
    def _(packed, absmax, blocksize, shape, dtype, nested_absmax=None, nested_code=None,
          nested_offset=None, nested_blocksize=256):  # fmt: skip
        torch._check(blocksize in NF4_BLOCKSIZES, lambda: f"blocksize must be one of {NF4_BLOCKSIZES}")
        n = math.prod(shape)
        torch._check(packed.dtype == torch.uint8, lambda: "packed must be uint8")
        torch._check(packed.numel() == (n + 1) // 2, lambda: "packed size does not match shape")
        torch._check(absmax.numel() == _ceil_div(n, blocksize), lambda: "absmax size does not match")
        return packed.new_empty(tuple(shape), dtype=dtype)

    @torch.library.register_fake("qlora_ext::blockwise8_quantize")
    def _(x, code, blocksize):
        _check_power_of_two_blocksize(blocksize)
        torch._check(x.dtype == torch.float32, lambda: "x must be float32")
        codes = x.new_empty(x.shape, dtype=torch.uint8)
        absmax = x.new_empty((_ceil_div(x.numel(), blocksize),), dtype=torch.float32)
        return codes, absmax

    @torch.library.register_fake("qlora_ext::blockwise8_dequantize")
    def _(codes, absmax, code, blocksize):
        _check_power_of_two_blocksize(blocksize)
        torch._check(codes.dtype == torch.uint8, lambda: "codes must be uint8")
        return codes.new_empty(codes.shape, dtype=torch.float32)
