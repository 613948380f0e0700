"""Python face of the torch.ops.qlora_ext operators: typed wrappers, fake (meta) kernels for
torch.compile, and input checks that need Python (schemas: cpp/torch/schemas.cpp).

The fakes compute output shapes only and never read data; they use torch._check so that a shape
error under torch.compile reads like the eager one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ._native import native
from .codebooks import dynamic_map, is_library_map

if TYPE_CHECKING:
    from .nf4 import NF4Weight

NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NF4_GEMV_MAX_ROWS = 16  # largest prod(x.shape[:-1]) that nf4_gemv takes (decode-sized batches)
NF4_GEMM_MAX_ROWS = 256  # largest prod(x.shape[:-1]) of nf4_gemm's tiled kernel (the op itself takes any)
NF4_GEMM_K_MULTIPLE = 64  # nf4_gemm's tensor-core path needs K % 64 == 0 (else it dequantizes)

# Whether `linear_route` may pick nf4_gemm, for 17..NF4_GEMM_ROUTE_MAX_ROWS rows; off, those take
# dequantize + linear (benchmarks flip it to compare the two routes). On since 2026-12-06: on the
# H100 (bench_nf4_gemm.py, benchmarks/results/nf4_gemm_h100.json) nf4_gemm beat dequantize + cuBLAS
# at 17 and 32 rows on all four BENCHMARKS.md shapes (28672x8192: 207 against 378 µs; 4096x4096:
# 24.7 against 27.4) and at 64 rows on three of them (4096x4096: 30.9 against 27.7 µs, 12% slower);
# from 128 rows on it loses where N or K is 4096 (4096x4096, M 256: 67 against 34 µs), so larger
# batches keep dequantize + cuBLAS.
NF4_GEMM_ENABLED = True
NF4_GEMM_ROUTE_MAX_ROWS = 64

# Whether `linear_route` may pick nf4_gemm past NF4_GEMM_ROUTE_MAX_ROWS rows where the op runs its Hopper kernel
# (compute capability 9.0 and a build with sm_90a code; bf16 x, blocksize 64, N % 8 == 0, K % 64 == 0:
# `nf4_gemm_sm90_applies`) and beats dequantize + cuBLAS (`nf4_gemm_sm90_wins`). Off, those rows take dequantize +
# linear. Measured on the H100 (session 28, bench_nf4_gemm.py with the route forced to the kernel,
# nf4_gemm_sm90_route_h100.json, the four 8B shapes, M 128-2048): where its 128 x 256 tiles fill the SMs it skips
# the dequantization the dense route writes (14336x4096, M 256: 56.8 against 109.0 µs; 28672x8192, M 1024: 838
# against 923); with few tiles (N = 4096 below M = 1024: 32-64 CTAs on 132 SMs) or past 1,024 rows (cuBLAS near its
# peak against the kernel's ~0.85 of cuBLAS) the dense route is faster (4096x4096, M 2048: 117.8 against 121.7 µs).
NF4_GEMM_SM90_ENABLED = True
NF4_GEMM_SM90_ROUTE_MAX_ROWS = 1024
NF4_GEMM_SM90_MIN_SM_FILL = 0.75  # CTAs (128 W rows x 256 x rows each) against the SM count, at the least


ROUTE_GEMV = "nf4_gemv"
ROUTE_GEMM = "nf4_gemm"
ROUTE_DENSE = "dequantize + linear"

logger = logging.getLogger("qlora_ext")


def _ops():
    native()  # loads the library that registers the operators
    return torch.ops.qlora_ext


def past_autograd(op, *args):
    """op(*args), dispatched past the op's autograd kernel when grad mode is off.

    The block ops (rms_norm, rope, swiglu, swiglu_scaled) and dora_column_scale have their autograd
    in Python (torch.library.register_autograd), which wraps every call in a few Python functions
    even where nothing records: inside an autograd.Function's forward or backward, or a
    checkpointed layer's first forward. That costs ~5 µs a call on a 2-core CPU (9.8 against 4.8
    µs for dora_column_scale on [16, 128]), on steps that are host-bound (a 1B QDoRA step makes
    ~8 such calls a layer). With grad mode on, or while torch.compile traces, a plain call."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


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


def nf4_dequantize_into(
    out: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """nf4_dequantize written into `out` (its shape and float dtype are the weight's shape and the
    target dtype), e.g. a row range of a buffer that holds several weights: contiguous, or a 2-D
    [N, K] view with unit stride along K and rows further apart (the left columns of a wider
    matrix, as [W | B] for a LoRA product with K + r). Returns out. No autograd (the base weight
    is frozen)."""
    _ops().nf4_dequantize_into(out, packed, absmax, blocksize, nested_absmax, nested_code, nested_offset,
                               nested_blocksize)  # fmt: skip
    return out


def nf4_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    weight_shape: Sequence[int],
    bias: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ deq(W [N, K]).T (+ bias [N]), fused (W is never materialised).

    x: fp32/fp16/bf16 with prod(x.shape[:-1]) <= 16; sums in fp32, y in x's dtype. The weight the
    products use is nf4 * scale held at least to x's dtype's precision: the CPU kernel and the CUDA
    "mma" variant round it to x's dtype exactly as `nf4_dequantize(..., x.dtype)` stores it; the
    "factored" variants round nf4 to x's dtype and multiply each block's partial sum by the fp32
    scale; "factored_split" keeps it to ~2^-17 (see nf4_gemv_cuda.cu). The weight arguments are
    those of `nf4_dequantize`. Differentiable in x and bias (not in W).
    """
    return _ops().nf4_gemv(
        x, packed, absmax, blocksize, list(weight_shape), bias,
        nested_absmax, nested_code, nested_offset, nested_blocksize,
    )  # fmt: skip


def nf4_gemv_variants() -> list[str]:
    """Names of nf4_gemv's CUDA fast-path kernel variants; the index is the variant number.

    Empty for a build without CUDA. "ring" (2026-12-07): for M <= 4 with blocksize 64 and
    K % 256 == 0 (fp16/bf16, aligned data, sm_80+) each warp streams its 16-row x 256-k items through
    a cp.async ring in shared memory and reads its codes in 16-byte runs, the two quantization blocks
    of a run kept apart in the MMA's column pairs; every other case takes factored_fill's kernels.
    Alone, on the H100, it takes 15-30% less time than factored_fill at M = 1 and 10-22% less at
    M = 4 (benchmarks/results/nf4_gemv_ring_h100.json). "ring_plain" is the same kernel never
    launched programmatically. "auto", the default since session 24 (2026-12-07), takes the ring
    where programmatic dependent launch is off and factored_fill's kernels where it is on: the 8B
    decode (decode_8b_ring_pdl_h100.json) ran 258.8 tok/s with the ring against 248.4 without PDL,
    but 238.8 against 273.7 with it (the likely cause: the shared-memory carveout the ring's 3 CTAs
    a SM need, decode_8b_ring_carveout_h100.json); with "auto", 271.5 with PDL and 256.0 without
    (factored_fill 275.5 / 246.9, decode_8b_auto_h100.json), and the whole CUDA suite passed with it.
    "ring32" (session 24) takes every M <= 16 in its domain (blocksize 64, K % 128 == 0) on 32-row
    tiles through the same kind of per-warp rings, the k order kept inside each quantization block so
    that 16 x rows fit one MMA's columns. On the H100 it took 22-30% less time than factored_fill at
    M = 16 and 2-24% less at M = 8 (benchmarks/results/nf4_gemv_ring32_h100.json); since session 25
    "auto" runs it at 5 <= M <= 16 where programmatic launch is off; since session 26 it loads x one
    item ahead (4-16% less time at M 5-16 on the H200, nf4_gemv_ring32_xpf_h200.json). Each item of the
    M <= 4 ring issues its first x loads before its next copies (the CuPy ring's order, session 24's variant "ring_early_x",
    the only order since session 25: 4-7% less time at M = 1, nf4_gemv_ring_early_x_h100.json).
    "factored_fill" (below) was the default from 2026-12-06; before, variant 1 ("factored"): on the H100 it beat
    variant 0 ("mma") at every measured shape, M = 1 and 16 (1.83-2.37x bf16 at M = 1 against
    1.59-2.02x; benchmarks/results/nf4_gemv_variants_h100.json), and the CUDA suite's GEMV users
    passed on it. The others stay switchable so that one process can measure them against each
    other (bench_nf4_linear.py --variants); "stream" and "stream2" (a cp.async shared-memory ring
    with a CTA barrier a stage, 2026-12-06) measured slower than "factored" except at 1024x4096,
    M = 16 (benchmarks/results/nf4_gemv_stream_h100.json) and were removed in session 25;
    "factored_wide" (a 64 KB table, one byte permute a lookup) within -4..+2% of it
    (nf4_gemv_wide_h100.json); "factored_o3" / "factored_o4" (3 / 4 CTAs a SM for M <= 8) 7-25% / 41-63% slower (nf4_gemv_occupancy_h100.json);
    "factored_fill" is "factored" but for M <= 8 launches whose 16-row tiles fit one round at 3
    CTAs a SM and not at 2 (8B's grouped q/k/v), which take factored_o3's shape: q/k/v 13.9 ->
    12.0 us, the 8B decode 2% faster (H200; nf4_gemv_swiglu_h200.json). Where it takes that shape
    a grouped launch's sums are ordered differently from the per-part launches' (equal within the
    reference's tolerance, not bit for bit). "factored_lean" and "factored_lean_wide" (session 21)
    are "factored" for one weight with the per-step part search and pointer selects folded away at
    compile time, which fits its full step in 80 registers: 3 CTAs a SM instead of 2 at M <= 8, the
    same bits as "factored" ("_wide": with factored_wide's 64 KB table); grouped launches take
    factored_fill's kernels. They
    apply where their kernel does (fp16/bf16, K % 64 == 0, blocksize >= 64, 16-byte aligned data,
    sm_80+); other cases take variant 0's path whatever the setting.
    """
    return list(native()._nf4_gemv_variants())


def nf4_gemv_variant() -> str:
    """The name of the nf4_gemv CUDA variant in use (process-wide)."""
    names = nf4_gemv_variants()
    return names[native()._nf4_gemv_variant()] if names else "none"


def set_nf4_gemv_variant(variant: str | int) -> None:
    """Select nf4_gemv's CUDA kernel variant (a name from `nf4_gemv_variants()` or its number).

    Process-wide and read at every launch: a CUDA graph keeps the kernel it captured.
    """
    names = nf4_gemv_variants()
    if isinstance(variant, str):
        if variant not in names:
            raise ValueError(f"variant must be one of {names}, got {variant!r}")
        variant = names.index(variant)
    native()._set_nf4_gemv_variant(int(variant))


def programmatic_launch_enabled() -> bool:
    """Whether the kernels that support it launch with programmatic dependent launch (below)."""
    return bool(native()._programmatic_launch())


@contextlib.contextmanager
def programmatic_launch(enabled: bool = True):
    """Programmatic dependent launch (PDL, sm_90+ GPUs) inside the block, then the previous
    setting: the NF4 GEMV, the RMSNorm and SwiGLU forwards, rope_append_kv_ and decode_attention's
    kernels may start before
    the kernel before them ends, and do their weight-only prologue (the GEMV's first weight loads
    and tables, the norm's weight row) under it; a CUDA graph captured inside keeps it. Only for
    stretches where no kernel writes those weights (decoding: qlora_ext.generate turns it on).
    Process-wide; a no-op without CUDA kernels (cpp/kernels/cuda/dependent_launch.cuh)."""
    before = programmatic_launch_enabled()
    native()._set_programmatic_launch(bool(enabled))
    try:
        yield
    finally:
        native()._set_programmatic_launch(before)


#: Environment variable naming the nf4_gemv variant a process starts with (read at import), so
#: that a whole test suite or benchmark can run on a candidate without code changes.
GEMV_VARIANT_ENV = "QLORA_NF4_GEMV_VARIANT"


def apply_gemv_variant_from_env() -> None:
    """set_nf4_gemv_variant($QLORA_NF4_GEMV_VARIANT) when the variable is set and non-empty; a name
    that is not a variant raises, naming the variable. Without CUDA variants it must be unset."""
    import os

    wanted = os.environ.get(GEMV_VARIANT_ENV, "").strip()
    if not wanted:
        return
    names = nf4_gemv_variants()
    if wanted not in names:
        choices = f"choose one of {names}" if names else "it has none (no CUDA kernels)"
        raise ValueError(f"{GEMV_VARIANT_ENV}={wanted!r} is not an nf4_gemv variant of this build: "
                         f"{choices}, or unset the variable")  # fmt: skip
    set_nf4_gemv_variant(wanted)


def nf4_gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    weight_shape: Sequence[int],
    bias: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """`nf4_gemv`'s product for prefill-sized x: prod(x.shape[:-1]) <= 256.

    On CUDA with fp16/bf16 x, K % 64 == 0 and an sm_80+ GPU it is a tiled tensor-core GEMM that
    dequantizes W inside (W is never materialised); otherwise it dequantizes W to x's dtype and
    multiplies. Same rounding contract and arguments as `nf4_gemv`; differentiable in x and bias.
    """
    return _ops().nf4_gemm(
        x, packed, absmax, blocksize, list(weight_shape), bias,
        nested_absmax, nested_code, nested_offset, nested_blocksize,
    )  # fmt: skip


def _weight_args(weight: NF4Weight) -> tuple:
    """The weight's arguments of nf4_gemv / nf4_dequantize, after x (packed .. nested_blocksize)."""
    nested = weight.nested
    return (
        weight.packed, weight.absmax, weight.blocksize, list(weight.shape),
        nested.absmax2 if nested else None,
        nested.code if nested else None,
        nested.offset.reshape(1) if nested else None,
        nested.blocksize if nested else 256,
    )  # fmt: skip


_NF4_GEMM_SM90_SMS: dict[int, int] = {}


@torch.compiler.assume_constant_result
def _nf4_gemm_sm90_sms(device_index: int) -> int:
    # The device's SM count where it runs the Hopper kernel, else 0. Asked once per device (the answer cannot
    # change in a process); a constant for torch.compile, so that a compiled route reads it too.
    sms = _NF4_GEMM_SM90_SMS.get(device_index)
    if sms is None:
        lib = native()
        with torch.cuda.device(device_index):
            ready = bool(lib.with_cuda and lib._nf4_gemm_sm90_ready())
        sms = torch.cuda.get_device_properties(device_index).multi_processor_count if ready else 0
        _NF4_GEMM_SM90_SMS[device_index] = sms
    return sms


def nf4_gemm_sm90_applies(x: torch.Tensor, weight: NF4Weight) -> bool:
    """Whether nf4_gemm runs `x · deq(weight)ᵀ` with its Hopper kernel (past `nf4_gemm_sm90_min_rows()` rows): x
    bf16 on a compute capability 9.0 device, a build with sm_90a code, blocksize 64, N % 8 == 0, K % 64 == 0.
    Reads shapes, dtypes and (once per device) the device's capability, never tensor values."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and weight.blocksize == 64 and len(weight.shape) == 2):
        return False
    n, k = weight.shape
    if n % 8 != 0 or k % NF4_GEMM_K_MULTIPLE != 0:
        return False
    return _sm_count(x) > 0


def _sm_count(x: torch.Tensor) -> int:
    return _nf4_gemm_sm90_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())


def nf4_gemm_sm90_wins(rows: int, n: int, sm_count: int) -> bool:
    """Whether the Hopper kernel beats dequantize + cuBLAS for `rows` x [n, K] on `sm_count` SMs: past the tiled
    kernel's rows, at most NF4_GEMM_SM90_ROUTE_MAX_ROWS, and enough 128 x 256 tiles to fill
    NF4_GEMM_SM90_MIN_SM_FILL of the SMs (measurements: NF4_GEMM_SM90_ENABLED's comment)."""
    tiles = _ceil_div(n, 128) * _ceil_div(rows, 256)
    return (NF4_GEMM_ROUTE_MAX_ROWS < rows <= NF4_GEMM_SM90_ROUTE_MAX_ROWS
            and tiles >= NF4_GEMM_SM90_MIN_SM_FILL * sm_count)  # fmt: skip


def nf4_gemm_sm90_min_rows() -> int:
    """The fewest rows for which nf4_gemm takes its Hopper kernel where it applies (0 in a build without CUDA)."""
    return int(native()._nf4_gemm_sm90_min_rows())


def set_nf4_gemm_sm90_min_rows(rows: int) -> None:
    """Move `nf4_gemm_sm90_min_rows` (process-wide): fewer rows than this take the tiled kernel (<= 256 rows) or
    dequantize + cuBLAS inside nf4_gemm. For benchmarks and tests that compare the kernels."""
    native()._set_nf4_gemm_sm90_min_rows(int(rows))


def outside_checkpointing() -> bool:
    """Whether no checkpointed layer is running its first forward or its recomputation (checkpointing.phase();
    assumed under torch.compile, which does not trace into the thread-local phase)."""
    if torch.compiler.is_compiling():
        return True
    from . import checkpointing

    return checkpointing.phase() is None


def linear_route(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None = None,
    trainable: Sequence[torch.Tensor] = (),
    caller: str = "nf4_linear_forward",
) -> str:
    """Which kernel computes `x [..., K] · deq(weight)ᵀ (+ bias)`: ROUTE_GEMV, ROUTE_GEMM or ROUTE_DENSE.

    The fused ops serve inference (x on CUDA, fp16/bf16, bias absent or in x's dtype, no gradient
    needed for x, bias or the tensors in `trainable`, a layer's adapters): `nf4_gemv` for at most
    16 rows (decode), `nf4_gemm` for 17..NF4_GEMM_ROUTE_MAX_ROWS (64) rows with K % 64 == 0
    (prefill chunks; switch: NF4_GEMM_ENABLED) and for up to 1,024 rows where its Hopper kernel applies and fills
    the GPU (`nf4_gemm_sm90_applies`, `nf4_gemm_sm90_wins`; switch: NF4_GEMM_SM90_ENABLED), outside checkpointed
    layers (whose first forward runs without a graph but must leave what the recomputation reuses). Everything
    else dequantizes and calls cuBLAS, which wins once the product is compute-bound. Reads only shapes, dtypes
    and flags, never tensor values, so a CUDA graph capture decides exactly as eager execution does. Logs the
    route at debug level on the "qlora_ext" logger, as "<caller>: <route> (...)".
    """
    rows = math.prod(x.shape[:-1])
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, bias, *trainable)
    )  # fmt: skip
    fusable = (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and not needs_grad
        and (bias is None or bias.dtype == x.dtype)
    )
    route = ROUTE_DENSE
    if fusable and rows <= NF4_GEMV_MAX_ROWS:
        route = ROUTE_GEMV
    elif (fusable and NF4_GEMM_ENABLED and rows <= min(NF4_GEMM_ROUTE_MAX_ROWS, NF4_GEMM_MAX_ROWS)
          and weight.shape[1] % NF4_GEMM_K_MULTIPLE == 0):  # fmt: skip
        route = ROUTE_GEMM
    elif (fusable and NF4_GEMM_SM90_ENABLED and NF4_GEMM_ROUTE_MAX_ROWS < rows <= NF4_GEMM_SM90_ROUTE_MAX_ROWS
          and outside_checkpointing() and nf4_gemm_sm90_applies(x, weight)
          and nf4_gemm_sm90_wins(rows, weight.shape[0], _sm_count(x))):  # fmt: skip
        route = ROUTE_GEMM
    if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "%s: %s (M=%d, N=%d, K=%d, %s, %s, requires_grad=%s)",
            caller, route, rows, weight.shape[0], weight.shape[1], x.dtype, x.device, needs_grad,
        )  # fmt: skip
    return route


def gemv_route(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None = None,
    trainable: Sequence[torch.Tensor] = (),
    caller: str = "nf4_linear_forward",
) -> bool:
    """Whether `linear_route` picks the fused `nf4_gemv` (kept for callers that ask only that)."""
    return linear_route(x, weight, bias, trainable, caller) == ROUTE_GEMV


def nf4_gemv_weight(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`nf4_gemv` with the weight given as an NF4Weight [N, K] (no routing: x must have <= 16 rows)."""
    packed, absmax, blocksize, shape, nested_absmax, nested_code, nested_offset, nested_bs = _weight_args(weight)
    return _ops().nf4_gemv(x, packed, absmax, blocksize, shape, bias, nested_absmax, nested_code, nested_offset, nested_bs)


def nf4_gemv_grouped_weights(x: torch.Tensor, weights: Sequence[NF4Weight], bias: torch.Tensor | None = None) -> torch.Tensor:
    """`nf4_gemv_grouped`: [x·deq(W_0)ᵀ, x·deq(W_1)ᵀ, ...] side by side (+ bias [sum N_p]) for NF4
    weights [N_p, K] that multiply the same x (no routing: x must have <= 16 rows).

    One CUDA launch for up to 4 weights where the factored kernels apply (their products equal
    `nf4_gemv_weight`'s with that kernel, bit for bit; where "factored_fill" gives the launch its
    3-CTA shape, "factored_o3"'s per part), so weights too small to fill the GPU alone
    (the attention's k and v) share it; otherwise, and on the CPU, weight by weight. The weights
    must share blocksize and form (all plain or all double-quantized, with equal nested maps and
    nested blocksizes): `grouped_gemv_compatible` says whether they do.
    """
    if not weights:
        raise ValueError("weights must hold at least one NF4Weight")
    first = weights[0]
    nested = first.nested
    nested_code = nested.code if nested else None
    return _ops().nf4_gemv_grouped(
        x, [w.packed for w in weights], [w.absmax for w in weights], first.blocksize,
        [int(w.shape[0]) for w in weights],
        [w.nested.absmax2 for w in weights] if nested else [], nested_code,
        [w.nested.offset.reshape(1) for w in weights] if nested else [],
        bias, nested.blocksize if nested else 256,
    )  # fmt: skip


def nf4_gemv_swiglu_weights(x: torch.Tensor, gate: NF4Weight, up: NF4Weight,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """`nf4_gemv_swiglu`: silu(x·deq(gate)ᵀ) * (x·deq(up)ᵀ) [..., N] for NF4 weights [N, K] (bias
    [2N]: gate's then up's), bit for bit `nf4_gemv_grouped_weights` followed by `block_ops.swiglu`
    (no routing: x must have <= 16 rows). On CUDA one launch where the factored kernels apply, the
    SwiGLU in the GEMV's epilogue, so the MLP's [M, 2N] gate/up output is never written; the weights
    must be `grouped_gemv_compatible` and of one shape."""
    nested = gate.nested
    return _ops().nf4_gemv_swiglu(
        x, [gate.packed, up.packed], [gate.absmax, up.absmax], gate.blocksize, [int(gate.shape[0]), int(up.shape[0])],
        [gate.nested.absmax2, up.nested.absmax2] if nested else [], nested.code if nested else None,
        [gate.nested.offset.reshape(1), up.nested.offset.reshape(1)] if nested else [],
        bias, nested.blocksize if nested else 256,
    )  # fmt: skip


def grouped_gemv_compatible(weights: Sequence[NF4Weight]) -> bool:
    """Whether `nf4_gemv_grouped_weights` takes these weights: 2-D, one K, blocksize, form, and (double
    quantization) nested blocksize, and nested maps of equal values, on one device. Compares the
    maps' values (a device sync when they are distinct tensors on a GPU): call it once, at setup."""
    if not weights or any(len(w.shape) != 2 for w in weights):
        return False
    first = weights[0]
    same = all(
        w.shape[1] == first.shape[1] and w.blocksize == first.blocksize and w.packed.device == first.packed.device
        and (w.nested is None) == (first.nested is None)
        for w in weights
    )  # fmt: skip
    if not same or first.nested is None:
        return same
    return all(
        w.nested.blocksize == first.nested.blocksize
        and (w.nested.code is first.nested.code or torch.equal(w.nested.code, first.nested.code))
        for w in weights
    )  # fmt: skip


def nf4_gemm_weight(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`nf4_gemm` with the weight given as an NF4Weight [N, K] (no routing; any number of rows)."""
    packed, absmax, blocksize, shape, nested_absmax, nested_code, nested_offset, nested_bs = _weight_args(weight)
    return _ops().nf4_gemm(x, packed, absmax, blocksize, shape, bias, nested_absmax, nested_code, nested_offset, nested_bs)


def fused_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, route: str) -> torch.Tensor:
    """The fused op of a `linear_route` result (ROUTE_GEMV or ROUTE_GEMM)."""
    if route == ROUTE_GEMV:
        return nf4_gemv_weight(x, weight, bias)
    if route == ROUTE_GEMM:
        return nf4_gemm_weight(x, weight, bias)
    raise ValueError(f"route must be {ROUTE_GEMV!r} or {ROUTE_GEMM!r}, got {route!r}")


def nf4_linear_forward(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, deq(weight), bias)` for an NF4 weight [N, K], by the fastest correct route.

    Inference with at most 16 rows takes the fused `nf4_gemv`, with 17..64 rows the tiled
    `nf4_gemm` (see `linear_route`); both read the 4-bit weight and never materialise it. Anything
    else dequantizes to x's dtype and calls `torch.nn.functional.linear`. The route is logged at
    debug level on the "qlora_ext" logger.
    """
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be [..., K] with K = {weight.shape[1]}, got shape {tuple(x.shape)}")
    route = linear_route(x, weight, bias)
    if route != ROUTE_DENSE:
        return fused_linear(x, weight, bias, route)
    return torch.nn.functional.linear(x, weight.dequantize(x.dtype), bias)


def blockwise8_quantize(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 256, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantize fp32 `x` (or `x - offset`, offset an fp32 tensor of one element,
    subtracted as torch would) against a sorted 256-entry map: (codes uint8, absmax fp32).

    `code` must be sorted ascending; a map that is not the library's own is checked here (the
    native op checks only CPU maps, to avoid a device sync per call).
    """
    if not is_library_map(code):
        _check_sorted(code, "code")
    return _ops().blockwise8_quantize(x, code, blocksize, offset)


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

    @torch.library.register_fake("qlora_ext::nf4_dequantize_into")
    def _(out, packed, absmax, blocksize, nested_absmax=None, nested_code=None, nested_offset=None,
          nested_blocksize=256):  # fmt: skip
        torch._check(blocksize in NF4_BLOCKSIZES, lambda: f"blocksize must be one of {NF4_BLOCKSIZES}")
        rows = out.dim() == 2 and out.stride(1) == 1 and out.stride(0) >= out.shape[1]
        torch._check(out.is_contiguous() or rows, lambda: "out must be contiguous, or 2-D with unit stride along K")
        n = out.numel()
        torch._check(packed.numel() == (n + 1) // 2, lambda: "packed size does not match out")
        torch._check(absmax.numel() == _ceil_div(n, blocksize), lambda: "absmax size does not match out")

    def _nf4_product_fake(op, max_rows):
        def fake(x, packed, absmax, blocksize, weight_shape, bias=None, nested_absmax=None, nested_code=None,
                 nested_offset=None, nested_blocksize=256):  # fmt: skip
            torch._check(
                x.dtype in (torch.float32, torch.float16, torch.bfloat16),
                lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}",
            )
            torch._check(len(weight_shape) == 2, lambda: f"weight_shape must be [N, K], got {weight_shape}")
            torch._check(x.dim() >= 1, lambda: "x must have at least one dimension [..., K]")
            n, k = weight_shape
            torch._check(x.shape[-1] == k, lambda: f"x must have K = {k} elements in its last dimension")
            rows = math.prod(x.shape[:-1])
            torch._check(rows <= max_rows, lambda: f"x has M = {rows} rows; {op} takes at most {max_rows}")
            torch._check(packed.dtype == torch.uint8, lambda: "packed must be uint8")
            torch._check(packed.numel() == (n * k + 1) // 2, lambda: "packed size does not match weight_shape")
            torch._check(absmax.numel() == _ceil_div(n * k, blocksize), lambda: "absmax size does not match")
            if bias is not None:
                torch._check(bias.dtype == x.dtype, lambda: "bias must have x's dtype")
                torch._check(bias.dim() == 1 and bias.shape[0] == n, lambda: f"bias must be [N] = [{n}]")
            return x.new_empty((*x.shape[:-1], n))

        return fake

    torch.library.register_fake("qlora_ext::nf4_gemv", _nf4_product_fake("nf4_gemv", NF4_GEMV_MAX_ROWS))
    torch.library.register_fake("qlora_ext::nf4_gemm", _nf4_product_fake("nf4_gemm", math.inf))

    def _gemv_setup_context(ctx, inputs, output):
        x, packed, absmax, blocksize, weight_shape, bias, nested_absmax, nested_code, nested_offset, nested_bs = inputs
        ctx.weight = (packed, absmax, blocksize, list(weight_shape), nested_absmax, nested_code, nested_offset, nested_bs)
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None

    def _gemv_backward(ctx, grad_y):
        # dx = dy @ deq(W) (W in x's dtype, as the forward used it); dbias = sum of dy over rows.
        packed, absmax, blocksize, shape, nested_absmax, nested_code, nested_offset, nested_bs = ctx.weight
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = _ops().nf4_dequantize(
                packed, absmax, blocksize, shape, ctx.x_dtype, nested_absmax, nested_code, nested_offset, nested_bs
            )
            grad_x = grad_y @ w
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = grad_y.reshape(-1, shape[0]).sum(0)
        return grad_x, None, None, None, None, grad_bias, None, None, None, None

    @torch.library.register_fake("qlora_ext::nf4_gemv_grouped")
    def _(x, packed, absmax, blocksize, rows, nested_absmax, nested_code, nested_offset, bias, nested_blocksize):
        torch._check(
            x.dtype in (torch.float32, torch.float16, torch.bfloat16),
            lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}",
        )
        torch._check(len(rows) >= 1, lambda: "rows must name at least one part")
        torch._check(len(packed) == len(rows) and len(absmax) == len(rows),
                     lambda: "packed and absmax must hold one tensor per part")  # fmt: skip
        torch._check(x.dim() >= 1, lambda: "x must have at least one dimension [..., K]")
        m = math.prod(x.shape[:-1])
        torch._check(m <= NF4_GEMV_MAX_ROWS, lambda: f"x has M = {m} rows; nf4_gemv_grouped takes at most 16")
        k = x.shape[-1]
        for p, n in enumerate(rows):
            torch._check(packed[p].numel() == (n * k + 1) // 2, lambda: f"packed[{p}] size does not match rows[{p}]")
        n_total = sum(rows)
        if bias is not None:
            torch._check(bias.dtype == x.dtype, lambda: "bias must have x's dtype")
            torch._check(bias.dim() == 1 and bias.shape[0] == n_total, lambda: f"bias must be [{n_total}]")
        return x.new_empty((*x.shape[:-1], n_total))

    def _grouped_setup_context(ctx, inputs, output):
        x, packed, absmax, blocksize, rows, nested_absmax, nested_code, nested_offset, bias, nested_bs = inputs
        ctx.parts = [
            (packed[p], absmax[p], blocksize, [n, x.shape[-1]], nested_absmax[p] if nested_code is not None else None,
             nested_code, nested_offset[p] if nested_code is not None else None, nested_bs)
            for p, n in enumerate(rows)
        ]  # fmt: skip
        ctx.rows = list(rows)
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None

    def _grouped_backward(ctx, grad_y):
        # dx = sum_p dy_p @ deq(W_p); dbias = sum of dy over rows (the parts side by side)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            for dy, (packed, absmax, bs, shape, n_absmax, n_code, n_offset, n_bs) in zip(
                grad_y.split(ctx.rows, dim=-1), ctx.parts
            ):
                w = _ops().nf4_dequantize(packed, absmax, bs, shape, ctx.x_dtype, n_absmax, n_code, n_offset, n_bs)
                part = dy @ w
                grad_x = part if grad_x is None else grad_x + part
        if ctx.has_bias and ctx.needs_input_grad[8]:
            grad_bias = grad_y.reshape(-1, sum(ctx.rows)).sum(0)
        parts, nested = [None] * len(ctx.rows), [None] * (len(ctx.rows) if ctx.parts[0][5] is not None else 0)
        return grad_x, parts, parts, None, None, nested, None, nested, grad_bias, None  # a list for each list input

    torch.library.register_autograd("qlora_ext::nf4_gemv_grouped", _grouped_backward,
                                    setup_context=_grouped_setup_context)  # fmt: skip

    @torch.library.register_fake("qlora_ext::nf4_gemv_swiglu")
    def _(x, packed, absmax, blocksize, rows, nested_absmax, nested_code, nested_offset, bias, nested_blocksize):
        torch._check(len(rows) == 2, lambda: f"nf4_gemv_swiglu: rows must name two parts (gate, up), got {len(rows)}")
        torch._check(rows[0] == rows[1], lambda: f"nf4_gemv_swiglu: gate and up must have equal rows, got {list(rows)}")
        both = torch.ops.qlora_ext.nf4_gemv_grouped.default(
            x, packed, absmax, blocksize, rows, nested_absmax, nested_code, nested_offset, bias, nested_blocksize)
        return both.new_empty((*both.shape[:-1], rows[0]))

    def _swiglu_gemv_setup_context(ctx, inputs, output):
        _grouped_setup_context(ctx, inputs, output)
        ctx.grouped_inputs = inputs
        ctx.save_for_backward(inputs[0])

    def _swiglu_gemv_backward(ctx, grad_h):
        # Recompute the grouped GEMV's [gate, up] (two NF4 GEMVs: cheap next to keeping them), take
        # SwiGLU's backward, then the grouped GEMV's with [dgate, dup] side by side.
        (x,) = ctx.saved_tensors
        _, *rest = ctx.grouped_inputs
        both = torch.ops.qlora_ext.nf4_gemv_grouped(x.detach(), *rest)
        n = ctx.rows[0]
        grad_gate, grad_up = torch.ops.qlora_ext.swiglu_backward(
            grad_h.contiguous(), both[..., :n].contiguous(), both[..., n:].contiguous())
        return _grouped_backward(ctx, torch.cat([grad_gate, grad_up], dim=-1))

    torch.library.register_autograd("qlora_ext::nf4_gemv_swiglu", _swiglu_gemv_backward,
                                    setup_context=_swiglu_gemv_setup_context)  # fmt: skip

    # nf4_gemm has nf4_gemv's arguments and math: one backward serves both.
    for op in ("qlora_ext::nf4_gemv", "qlora_ext::nf4_gemm"):
        torch.library.register_autograd(op, _gemv_backward, setup_context=_gemv_setup_context)

    @torch.library.register_fake("qlora_ext::blockwise8_quantize")
    def _(x, code, blocksize, offset=None):
        _check_power_of_two_blocksize(blocksize)
        torch._check(x.dtype == torch.float32, lambda: "x must be float32")
        if offset is not None:
            torch._check(offset.dtype == torch.float32, lambda: "offset must be float32")
            torch._check(offset.numel() == 1, lambda: "offset must have one element")
        codes = x.new_empty(x.shape, dtype=torch.uint8)
        absmax = x.new_empty((_ceil_div(x.numel(), blocksize),), dtype=torch.float32)
        return codes, absmax

    @torch.library.register_fake("qlora_ext::blockwise8_dequantize")
    def _(codes, absmax, code, blocksize):
        _check_power_of_two_blocksize(blocksize)
        torch._check(codes.dtype == torch.uint8, lambda: "codes must be uint8")
        return codes.new_empty(codes.shape, dtype=torch.float32)
