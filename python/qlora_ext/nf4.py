"""`NF4Weight`: a weight stored as NF4 codes with (double-quantized) block scales, in exactly the
layout and state-dict form of bitsandbytes (DESIGN.md §3), so checkpoints move both ways.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from . import _ops
from .codebooks import dynamic_map, nf4_code

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed block of the 8-bit absmax quantization


@dataclass
class NestedScales:
    """Double quantization of the per-block absmax: absmax_i = map8[codes_i] * absmax2[i // 256] + offset."""

    absmax2: torch.Tensor  # fp32 [ceil(n_blocks / blocksize)]
    code: torch.Tensor  # fp32 [256], the signed dynamic map
    offset: torch.Tensor  # fp32 0-d, mean of the original absmax
    blocksize: int = NESTED_BLOCKSIZE

    def to(self, device) -> "NestedScales":
        return NestedScales(self.absmax2.to(device), self.code.to(device), self.offset.to(device), self.blocksize)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in FLOAT_DTYPES.items():
        if d == dtype:
            return name
    raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")


class NF4Weight:
    """A quantized weight: NF4 codes, block scales, and the shape/dtype to dequantize to.

    Build one with `NF4Weight.from_float(w)` or `NF4Weight.from_state_dict(sd)`.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: Sequence[int],
        dtype: torch.dtype,
        blocksize: int = 64,
        nested: NestedScales | None = None,
    ):
        self.packed = packed  # uint8 [(n+1)//2, 1]
        self.absmax = absmax  # fp32 [n_blocks], or uint8 [n_blocks] codes when nested
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.nested = nested

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_float(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> "NF4Weight":
        """Quantize a float tensor (any shape) on its own device.

        NaN or Inf in `weight` raise ValueError: they cannot be represented, and a silently wrong
        scale would corrupt the whole block around them.
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dtype not in FLOAT_DTYPES.values():
            raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
        if blocksize not in _ops.NF4_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {_ops.NF4_BLOCKSIZES}, got {blocksize}")
        if weight.numel() == 0:
            packed, absmax = _ops.nf4_quantize(weight.detach(), blocksize)
            return cls(packed, absmax, weight.shape, weight.dtype, blocksize, None)
        nested = None
        if double_quant:
            code = dynamic_map(signed=True, device=weight.device)
            packed, absmax, absmax2, offset = _ops.nf4_double_quantize(weight.detach(), blocksize, code)
            nested = NestedScales(absmax2, code, offset)
        else:
            packed, absmax = _ops.nf4_quantize(weight.detach(), blocksize)
            offset = absmax.mean()
        # A block holding NaN gets absmax NaN and one holding inf absmax inf, so the mean (the
        # offset) is finite exactly when the weight is: one check, one device sync, at the end
        # (the value itself is copied, not an isfinite of it: two fewer kernels).
        if not math.isfinite(offset.item()):
            raise ValueError("weight contains NaN or Inf values (or |w| near 3e38), which NF4 cannot represent")
        return cls(packed, absmax, weight.shape, weight.dtype, blocksize, nested)

    # ---- use -------------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense tensor of the original shape (in `dtype`, default the original)."""
        nested = self.nested
        return _ops.nf4_dequantize(
            self.packed, self.absmax, self.blocksize, self.shape, dtype or self.dtype,
            nested.absmax2 if nested else None,
            nested.code if nested else None,
            nested.offset.reshape(1) if nested else None,
            nested.blocksize if nested else NESTED_BLOCKSIZE,
        )  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized representation (codes and all scales)."""
        tensors = [self.packed, self.absmax]
        if self.nested:
            tensors += [self.nested.absmax2, self.nested.code, self.nested.offset]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device) -> "NF4Weight":
        return NF4Weight(
            self.packed.to(device), self.absmax.to(device), self.shape, self.dtype, self.blocksize,
            self.nested.to(device) if self.nested else None,
        )  # fmt: skip

    def __repr__(self) -> str:
        dq = ", double_quant" if self.nested else ""
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}"
            f"{dq}, device={self.device}, {self.nbytes * 8 / max(self.numel, 1):.3f} bits/param)"
        )

    # ---- bitsandbytes' state-dict form ----------------------------------------------------------

    def quant_state_json(self) -> dict:
        """The non-tensor fields, in bitsandbytes' key order."""
        state = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.nested:
            state["nested_blocksize"] = self.nested.blocksize
            state["nested_dtype"] = "float32"
            state["nested_offset"] = self.nested.offset.item()
        return state

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """Tensors under bitsandbytes' keys: `prefix`, `prefix.absmax`, `prefix.quant_map`, ..."""
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        sd = {
            prefix: self.packed,
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": nf4_code(self.device),
        }
        if self.nested:
            sd[f"{prefix}.nested_absmax"] = self.nested.absmax2
            # A separate tensor (not a view of a shared one) so safetensors keeps it.
            sd[f"{prefix}.nested_quant_map"] = self.nested.code.clone()
        sd[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8, device=self.device)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "weight") -> "NF4Weight":
        """Rebuild from tensors written by `state_dict` or by bitsandbytes/transformers.

        Every field is validated (shapes, dtypes, JSON) before use; a problem raises ValueError
        naming the key.
        """
        state_key = f"{prefix}.quant_state.bitsandbytes__nf4"
        if state_key not in sd:
            if f"{prefix}.quant_state.bitsandbytes__fp4" in sd:
                raise ValueError(f"{prefix}: FP4-quantized weights are not supported, only NF4")
            raise ValueError(f"missing key {state_key!r}: not an NF4 bitsandbytes weight")
        try:
            state = json.loads(bytes(sd[state_key].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{state_key}: not valid UTF-8 JSON ({exc})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{state_key}: expected a JSON object, got {type(state).__name__}")

        def field(name, kind):
            if name not in state:
                raise ValueError(f"{state_key}: missing field {name!r}")
            value = state[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{state_key}: field {name!r} has the wrong type ({value!r})")
            return value

        if field("quant_type", str) != "nf4":
            raise ValueError(f"{state_key}: quant_type {state['quant_type']!r} is not supported, only 'nf4'")
        blocksize = field("blocksize", int)
        if blocksize not in _ops.NF4_BLOCKSIZES:
            raise ValueError(f"{state_key}: blocksize {blocksize} not in {_ops.NF4_BLOCKSIZES}")
        dtype_name = field("dtype", str)
        if dtype_name not in FLOAT_DTYPES:
            raise ValueError(f"{state_key}: dtype {dtype_name!r} not in {list(FLOAT_DTYPES)}")
        shape = field("shape", list)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"{state_key}: shape {shape!r} must be a list of non-negative ints")
        n = math.prod(shape)

        def tensor(key, dtype=None, numel=None):
            if key not in sd:
                raise ValueError(f"missing key {key!r}")
            t = sd[key]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{key}: expected a tensor, got {type(t).__name__}")
            if dtype is not None and t.dtype != dtype:
                raise ValueError(f"{key}: expected dtype {dtype}, got {t.dtype}")
            if numel is not None and t.numel() != numel:
                raise ValueError(f"{key}: expected {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")
            return t

        # bitsandbytes may store the codes in a float "quant_storage" dtype (for FSDP); the bytes
        # are the same, so view them as uint8.
        packed = tensor(prefix)
        packed = packed.contiguous().view(torch.uint8).reshape(-1, 1)
        if packed.numel() != (n + 1) // 2:
            raise ValueError(f"{prefix}: expected {(n + 1) // 2} bytes of codes for shape {shape}, got {packed.numel()}")
        quant_map = tensor(f"{prefix}.quant_map", torch.float32, 16)
        if not torch.equal(quant_map.cpu(), nf4_code()):
            raise ValueError(f"{prefix}.quant_map: is not the NF4 code map")
        n_blocks = -(-n // blocksize)
        nested = None
        # Double-quantized if either the tensors or the JSON say so; then both must be complete.
        if f"{prefix}.nested_absmax" in sd or "nested_offset" in state:
            nested_blocksize = field("nested_blocksize", int)
            if nested_blocksize <= 0 or nested_blocksize & (nested_blocksize - 1):
                raise ValueError(f"{state_key}: nested_blocksize {nested_blocksize} is not a power of two")
            if field("nested_dtype", str) != "float32":
                raise ValueError(f"{state_key}: nested_dtype must be 'float32'")
            offset_value = field("nested_offset", (int, float))
            if not math.isfinite(offset_value):
                raise ValueError(f"{state_key}: nested_offset must be finite, got {offset_value}")
            absmax = tensor(f"{prefix}.absmax", torch.uint8, n_blocks)
            absmax2 = tensor(f"{prefix}.nested_absmax", torch.float32, -(-n_blocks // nested_blocksize))
            code = tensor(f"{prefix}.nested_quant_map", torch.float32, 256)
            # JSON holds the fp32 offset printed as a double: parsing and rounding gives it back exactly.
            offset = torch.tensor(float(offset_value), dtype=torch.float32, device=absmax.device)
            nested = NestedScales(absmax2.contiguous(), code.contiguous(), offset, nested_blocksize)
        else:
            absmax = tensor(f"{prefix}.absmax", torch.float32, n_blocks)
        return cls(packed, absmax.contiguous(), shape, FLOAT_DTYPES[dtype_name], blocksize, nested)
