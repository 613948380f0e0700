"""nf4_gemv (fused NF4 GEMV / skinny GEMM) against the fp32 reference, on every device present,
and on CUDA for every kernel variant (`ops.nf4_gemv_variants()`).

The reference is the exact product in fp32: x @ (nf4 * scale).T with the weight dequantized in
fp32 (reference.nf4_gemv). Tolerance follows FlashAttention's rule: the op's error against it may
be at most twice the error that plain PyTorch makes in the same dtype (`x @ deq(W, x.dtype).T +
bias` computed in x's dtype, so its error includes rounding the weight to x's dtype), plus one ulp
of the output's scale for the cases where PyTorch happens to be exact, plus fp32 summation-order
noise. (The reference used to multiply the weight already rounded to x's dtype, which held the
kernels to that one rounding of W; the factored CUDA variants round nf4 before the scale, or not
at all, and are judged on the exact product like PyTorch.)
"""

from __future__ import annotations

import math

import logging

import os

import pytest
import torch

import qlora_ext
from qlora_ext import ops, reference

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")

HAS_CUDA = torch.cuda.is_available() and qlora_ext.build_info()["with_cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# nf4_gemv's CUDA kernel variants (names from the built module; empty without CUDA).
VARIANTS = ops.nf4_gemv_variants() if HAS_CUDA else []
# (device, variant) pairs: the CPU kernel once, the CUDA kernel once per variant.
DEVICE_VARIANTS = [pytest.param("cpu", None, id="cpu")] + (
    [pytest.param("cuda", v, id=f"cuda-{v}") for v in VARIANTS]
    if HAS_CUDA
    else [pytest.param("cuda", None, id="cuda", marks=pytest.mark.skip(reason="needs a CUDA build and GPU"))]
)


@pytest.fixture
def use_variant():
    """use_variant(name) selects nf4_gemv's CUDA variant for the test; the old one comes back after."""
    if not HAS_CUDA:
        yield lambda name: None
        return
    before = ops.nf4_gemv_variant()

    def select(name):
        if name is not None:
            ops.set_nf4_gemv_variant(name)

    try:
        yield select
    finally:
        ops.set_nf4_gemv_variant(before)


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def make_case(device, dtype, M, N, K, blocksize=64, double_quant=True, bias=True, x_shape=None, seed=None):
    """Fresh random weight (NF4), x and bias; returns (x, weight, bias)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**31))
    w = torch.randn(N, K, generator=gen) * 0.05
    weight = qlora_ext.NF4Weight.from_float(w.to(device), blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
    if x_shape is not None:
        x = x.reshape(x_shape)
    b = (torch.randn(N, generator=gen) * 0.1).to(device=device, dtype=dtype) if bias else None
    return x, weight, b


def gemv(x, weight, bias=None):
    packed, absmax, blocksize, shape, nested_absmax, nested_code, nested_offset, nested_bs = ops._weight_args(weight)
    return ops.nf4_gemv(x, packed, absmax, blocksize, shape, bias, nested_absmax, nested_code, nested_offset, nested_bs)


def gemv_reference(x, weight, bias=None):
    packed, absmax, blocksize, shape, nested_absmax, nested_code, nested_offset, nested_bs = ops._weight_args(weight)
    y = reference.nf4_gemv(
        x.reshape(-1, shape[1]), packed, absmax, blocksize, shape, bias, nested_absmax, nested_code, nested_offset, nested_bs
    )
    return y.reshape(*x.shape[:-1], shape[0])


def assert_close_to_reference(out, x, weight, bias):
    ref = gemv_reference(x, weight, bias)
    w = weight.dequantize(x.dtype)
    baseline = x @ w.T if bias is None else torch.nn.functional.linear(x, w, bias)  # plain PyTorch, x's dtype
    assert out.dtype == x.dtype and out.shape == ref.shape
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), "non-finite output"
    err = (out.float() - ref).abs().max().item()
    base_err = (baseline.float() - ref).abs().max().item()
    # One ulp of the output's scale, plus fp32 summation-order noise (the op and PyTorch sum in
    # different orders; for fp32 PyTorch's product *is* the reference): sqrt(K) roundings of the
    # running sum's scale, the usual probabilistic bound (one rounding was too tight: seed 332281682
    # gave 1.4 ulp on a 129x96 fp32 case).
    dot_scale = (x.float().abs() @ w.float().abs().T).max().item() if x.numel() else 0.0
    order_noise = torch.finfo(torch.float32).eps * math.sqrt(x.shape[-1]) * dot_scale
    slack = torch.finfo(x.dtype).eps * ref.abs().max().item() + order_noise + 1e-7
    # PyTorch's error is one draw of how rounding W to x's dtype falls; over a few outputs its max can land
    # far below that rounding's usual size (N = 1, K = 4160 failed once on the H200 in session 26: 0.0076
    # against PyTorch's 0.00023 + 0.0057, on a kernel that rounds W as finely). The yardstick is the larger of
    # that draw and the usual size, eps / 2 * sqrt(sum_k (x_k w_k)^2) (~1.7 sigma of a uniform rounding). A
    # simulated kernel with PyTorch's own error model failed the bare draw 39 times in 1,000 at N = 1 and
    # this one never; a wrong element or block costs |x_k w_k| or more, far above it.
    x2 = x.float().reshape(-1, x.shape[-1]) ** 2
    usual = torch.finfo(x.dtype).eps / 2 * (x2 @ (w.float() ** 2).T).sqrt().max().item()
    yardstick = max(base_err, usual)
    assert err <= 2 * yardstick + slack, (
        f"error {err:.3g} > 2 x PyTorch's {base_err:.3g} (its usual {usual:.3g}) + {slack:.2g}"
    )


# ---- correctness ------------------------------------------------------------------------------

SHAPES = [  # (N, K): aligned, K not a multiple of 64 or 32 (blocks straddle rows), odd N, tiny
    (64, 4096),
    (33, 4100),
    (7, 100),
    (129, 96),  # K % 64 == 32: the "mma" kernel whatever the variant
    (1, 4160),
    (48, 33),
    (45, 4160),  # K % 64 == 0, not a multiple of a factored step (256 k): a part-empty last step
    (300, 2112),  # N not a multiple of 16 or 32 rows
    (17, 192),  # fewer k-steps than warps: idle warps in every tile
    (37, 1536),  # "ring": 6 items a tile; ring32: 12 steps, 4 of 8 warps take two, a 5-row last tile
    (300, 3072),  # 10 tiles of 32 rows (ring32) with a 12-row last one, 24 k-steps a tile
    (17, 256),  # "ring": one 256-k item a tile, 7 of 8 warps idle, a one-row last tile
    (50, 768),  # "ring": 3 items a tile
]
MS = [1, 2, 3, 7, 8, 9, 16]


@pytest.mark.parametrize("device,variant", DEVICE_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("N,K", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_matches_reference(device, variant, dtype, M, N, K, use_variant):
    use_variant(variant)
    x, weight, bias = make_case(device, dtype, M, N, K)
    assert_close_to_reference(gemv(x, weight, bias), x, weight, bias)


@pytest.mark.parametrize("device,variant", DEVICE_VARIANTS)
@pytest.mark.parametrize("M", [1, 9])
@pytest.mark.parametrize("K", [320, 2048])
def test_many_tiles(device, variant, M, K, use_variant):
    # More row tiles than the persistent grid has CTAs (2 per SM: 264 on an H100; 16- or 32-row
    # tiles): each CTA loops over tiles, and the factored kernels prefetch across the boundary
    # (K = 320), the streamed ones run their ring of stages across it (K = 2048).
    use_variant(variant)
    x, weight, bias = make_case(device, torch.bfloat16, M, 8500, K)
    assert_close_to_reference(gemv(x, weight, bias), x, weight, bias)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("M", [1, 4])
def test_ring_large_weight(dtype, double_quant, M, use_variant):
    # N * K >= 2^27 takes the ring kernel's 3-stage, 2-CTA configuration (the smaller weights above
    # its 2-stage, 3-CTA one); N % 16 != 0 and many tiles a CTA
    use_variant("ring")
    x, weight, bias = make_case("cuda", dtype, M, 16400, 8192, double_quant=double_quant)
    assert_close_to_reference(gemv(x, weight, bias), x, weight, bias)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("M", [5, 16])
@pytest.mark.parametrize("extra_rows", [0, 1, 33])
def test_ring32_through_auto_around_one_tile_a_sm(dtype, double_quant, M, extra_rows, use_variant):
    # "auto" at 5 <= M <= 16 runs ring32: weights of one 32-row tile a SM, and just past it (the last with a
    # partial tile), where a CTA's second tile begins
    use_variant("auto")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x, weight, bias = make_case("cuda", dtype, M, 32 * sms + extra_rows, 1280, double_quant=double_quant)
    assert_close_to_reference(gemv(x, weight, bias), x, weight, bias)


@pytest.mark.parametrize("device,variant", DEVICE_VARIANTS)
@pytest.mark.parametrize("blocksize", ops.NF4_BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_block_sizes_and_scales(device, variant, blocksize, double_quant, with_bias, use_variant):
    use_variant(variant)
    cases = [
        (torch.bfloat16, (3, 40, 4096 + 96)),  # K % 64 == 32
        (torch.float16, (9, 17, 2 * blocksize + 36)),  # K % 32 != 0
        # K % 64 == 0 (the factored kernels), blocks straddling rows where K % blocksize != 0:
        (torch.bfloat16, (1, 40, 4096 + 64)),
        (torch.float16, (16, 33, 2 * blocksize + 64)),
        (torch.bfloat16, (8, 50, 3 * blocksize + 128)),
        (torch.float16, (2, 45, 2048)),  # the streamed kernels at blocksize 64 (staged scales)
        (torch.bfloat16, (4, 33, 1280)),  # "ring" at blocksize 64: 5 items a tile, 3 warps idle
    ]
    for dtype, (M, N, K) in cases:
        x, weight, bias = make_case(device, dtype, M, N, K, blocksize, double_quant, with_bias)
        assert_close_to_reference(gemv(x, weight, bias), x, weight, bias)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_1d_x(device):
    x, weight, bias = make_case(device, torch.bfloat16, 6, 24, 256, x_shape=(2, 3, 256))
    out = gemv(x, weight, bias)
    assert out.shape == (2, 3, 24)
    assert_close_to_reference(out, x, weight, bias)
    x1 = x[0, 0]
    out1 = gemv(x1, weight, bias)
    assert out1.shape == (24,)
    assert torch.equal(out1, out[0, 0])


@pytest.mark.parametrize("device,variant", DEVICE_VARIANTS)
def test_non_contiguous_and_misaligned(device, variant, use_variant):
    # A transposed x, and x / codes whose data start 2 or 1 bytes past an aligned address: the CUDA
    # kernel must take its scalar path for those and still be right.
    use_variant(variant)
    x, weight, bias = make_case(device, torch.float16, 4, 32, 512)
    xt = x.T.contiguous().T
    assert not xt.is_contiguous()
    assert_close_to_reference(gemv(xt, weight, bias), x, weight, bias)

    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=device)
    x_off = storage[1:].view_as(x)
    x_off.copy_(x)
    assert x_off.data_ptr() % 16 != 0
    assert_close_to_reference(gemv(x_off, weight, bias), x, weight, bias)

    packed_storage = torch.empty(weight.packed.numel() + 1, dtype=torch.uint8, device=device)
    packed_off = packed_storage[1:].view_as(weight.packed)
    packed_off.copy_(weight.packed)
    shifted = qlora_ext.NF4Weight(packed_off, weight.absmax, weight.shape, weight.dtype, weight.blocksize, weight.nested)
    assert_close_to_reference(gemv(x, shifted, bias), x, weight, bias)


@pytest.mark.parametrize("device,variant", DEVICE_VARIANTS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_misaligned_scales(device, variant, double_quant, use_variant):
    # Scales (8-bit codes, or fp32 absmax) starting 1 byte / 1 float past an aligned address: the
    # streamed kernels copy them in 8- or 16-byte pieces, so they must hand the case on.
    use_variant(variant)
    x, weight, bias = make_case(device, torch.bfloat16, 3, 40, 2048, double_quant=double_quant)
    storage = torch.empty(weight.absmax.numel() + 1, dtype=weight.absmax.dtype, device=device)
    absmax_off = storage[1:]
    absmax_off.copy_(weight.absmax)
    assert absmax_off.data_ptr() % 16 != 0
    shifted = qlora_ext.NF4Weight(weight.packed, absmax_off, weight.shape, weight.dtype, weight.blocksize, weight.nested)
    assert_close_to_reference(gemv(x, shifted, bias), x, weight, bias)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_shapes(device):
    x, weight, bias = make_case(device, torch.bfloat16, 1, 8, 0)
    out = gemv(x, weight, bias)
    assert torch.equal(out, bias.reshape(1, 8))
    assert out.data_ptr() != bias.data_ptr()  # a new tensor: an operator's output never aliases an input
    x, weight, _ = make_case(device, torch.bfloat16, 2, 0, 64, bias=False)
    assert gemv(x, weight).shape == (2, 0)
    x0 = torch.empty(0, 64, dtype=torch.bfloat16, device=device)
    assert gemv(x0, weight).shape == (0, 0)


@pytest.mark.parametrize("device,variant", DEVICE_VARIANTS)
@pytest.mark.parametrize("M", [1, 16])
def test_deterministic(device, variant, M, use_variant):
    use_variant(variant)
    x, weight, bias = make_case(device, torch.bfloat16, M, 600, 4096)
    assert torch.equal(gemv(x, weight, bias), gemv(x, weight, bias))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_cuda_matches_cpu_kernel(dtype, variant, use_variant):
    # The same weight, bytes and x on both devices: outputs differ by summation order, and for the
    # factored variants by where W is rounded (nf4 before the scale, or not at all).
    use_variant(variant)
    x, weight, bias = make_case("cpu", dtype, 5, 300, 2048)
    out_cpu = gemv(x, weight, bias)
    out_cuda = gemv(x.cuda(), weight.to("cuda"), bias.cuda()).cpu()
    torch.testing.assert_close(out_cuda.float(), out_cpu.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
def test_cuda_kernel_is_registered():
    # A CUDA build must dispatch to its own kernel, never silently fall back.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("qlora_ext::nf4_gemv", "CUDA")


@pytest.mark.not_under_sanitizer  # reads kernel names from torch.profiler (CUPTI)
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_variant_switch_launches_its_kernel(variant, use_variant):
    # The switch must reach the launcher: the profiler names the kernel each variant ran, and a
    # case outside the factored kernels' domain (K % 64 == 32) falls back to the "mma" kernel.
    use_variant(variant)
    assert ops.nf4_gemv_variant() == variant
    expected = {
        "mma": "nf4_gemv_mma_kernel",
        "ring": "nf4_gemv_ring_kernel",
        "ring_plain": "nf4_gemv_ring_kernel",
        "auto": "nf4_gemv_ring_kernel",  # (programmatic launch is off here; M = 3)
        "ring32": "nf4_gemv_ring32_kernel",
    }.get(variant, "nf4_gemv_factored_kernel")
    for K, kernel in [(4096, expected), (4096 + 32, "nf4_gemv_mma_kernel")]:
        x, weight, bias = make_case("cuda", torch.bfloat16, 3, 64, K)
        gemv(x, weight, bias)  # warm-up outside the profile
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            gemv(x, weight, bias)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if "nf4_gemv" in e.name]
        if not names:
            pytest.skip("the profiler recorded no CUDA kernels here (no CUPTI?)")
        assert any(kernel in n for n in names), f"variant {variant}, K={K}: ran {names}, expected {kernel}"
        # the template's flags are <..., SPLIT, WIDE, CTAS, GLU, LEAN> (demangled, or Itanium-mangled)
        flags = {
            "factored_split": ("true, false, 2, false, false>", "Lb1ELb0ELi2ELb0ELb0E"),
            "factored_wide": ("false, true, 2, false, false>", "Lb0ELb1ELi2ELb0ELb0E"),
            "factored_lean": ("false, false, 3, false, true>", "Lb0ELb0ELi3ELb0ELb1E"),
            "factored_lean_wide": ("false, true, 3, false, true>", "Lb0ELb1ELi3ELb0ELb1E"),
        }.get(variant)
        if flags and kernel == expected:
            assert any(flags[0] in n or flags[1] in n for n in names), names
    if variant in ("ring", "ring_plain", "auto", "ring32"):
        # outside its domain (the ring: M > 4, blocksize 128, K % 256 != 0; ring32: blocksize 128, K % 128 != 0,
        # and double-quantized block codes whose last 4-byte word would end past the array, N K / 64 % 4 == 2;
        # auto: the ring's domain at M <= 4, ring32's at M >= 5): factored_fill's kernel
        outside = [(1, 64, 4096, 128), (1, 64, 4096 + 64, 64)]
        outside += {"ring32": [(1, 63, 128, 64)], "auto": [(5, 64, 4096, 128), (5, 63, 128, 64)]}.get(
            variant, [(5, 64, 4096, 64)]
        )
        for M, N, K, blocksize in outside:
            x, weight, bias = make_case("cuda", torch.bfloat16, M, N, K, blocksize)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                gemv(x, weight, bias)
                torch.cuda.synchronize()
            names = [e.name for e in prof.events() if "nf4_gemv" in e.name]
            assert any("nf4_gemv_factored_kernel" in n for n in names), (M, K, blocksize, names)
    if variant == "factored_fill":  # 2 x SMs + 1 tiles of 16 rows: one round at 3 CTAs a SM
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        x, weight, bias = make_case("cuda", torch.bfloat16, 1, 16 * (2 * sms + 1), 256)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            gemv(x, weight, bias)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if "nf4_gemv" in e.name]
        assert any("false, false, 3, false, false>" in n or "Lb0ELb0ELi3ELb0ELb0E" in n for n in names), names


@pytest.mark.not_under_sanitizer  # reads kernel names from torch.profiler (CUPTI)
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
@pytest.mark.parametrize("programmatic", [False, True])
@pytest.mark.parametrize("M", [2, 4, 5, 16])
def test_auto_takes_the_rings_only_without_programmatic_launch(M, programmatic, use_variant):
    # Under programmatic dependent launch (generation's decode) the ring's shared-memory carveout costs
    # its neighbours more than it saves (decode_8b_ring_pdl_h100.json), so "auto" runs factored_fill's
    # kernel there; without it the ring at M <= 4 and ring32 at 5 <= M <= 16 (nf4_gemv_ring32_h100.json).
    # The output is the reference's either way.
    use_variant("auto")
    x, weight, bias = make_case("cuda", torch.bfloat16, M, 96, 4096)
    with ops.programmatic_launch(programmatic):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = gemv(x, weight, bias)
            torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "nf4_gemv" in e.name]
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels here (no CUPTI?)")
    ring = "nf4_gemv_ring_kernel" if M <= 4 else "nf4_gemv_ring32_kernel"
    expected = "nf4_gemv_factored_kernel" if programmatic else ring
    assert any(expected in n for n in names), (M, programmatic, names)
    assert_close_to_reference(out, x, weight, bias)


def test_variant_switch_api(use_variant):
    names = ops.nf4_gemv_variants()
    if not HAS_CUDA:
        assert names == []
        with pytest.raises(ValueError, match="no CUDA kernels"):
            ops.set_nf4_gemv_variant(0)
        return
    assert names[0] == "mma" and "factored" in names and "factored_split" in names
    # "auto" (the ring without programmatic launch, factored_fill's kernels with it) is the default,
    # unless the process was started on another (QLORA_NF4_GEMV_VARIANT)
    assert ops.nf4_gemv_variant() == (os.environ.get(ops.GEMV_VARIANT_ENV, "").strip() or "auto")
    for i, name in enumerate(names):
        ops.set_nf4_gemv_variant(name)
        assert ops.nf4_gemv_variant() == name
        ops.set_nf4_gemv_variant(i)
        assert ops.nf4_gemv_variant() == name
    with pytest.raises(ValueError, match="variant must be one of"):
        ops.set_nf4_gemv_variant("fastest")
    with pytest.raises(ValueError, match=r"variant must be in \[0, "):
        ops.set_nf4_gemv_variant(len(names))


def test_cpu_kernel_is_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("qlora_ext::nf4_gemv", "CPU")


# ---- autograd, opcheck, compile ----------------------------------------------------------------


def check_gradients(fn, device, rows):
    """fn(x, weight, bias)'s gradients for x and bias equal autograd through F.linear on deq(W)."""
    x, weight, bias = make_case(device, torch.float32, rows, 20, 200)
    x.requires_grad_(True)
    bias.requires_grad_(True)
    fn(x, weight, bias).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, weight.dequantize(torch.float32), b_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias.grad, b_ref.grad, rtol=1e-4, atol=1e-4)


def opcheck_op(op, device, cases):
    """torch.library.opcheck of `op` on each (dtype, M, N, K, blocksize, double_quant, bias, grad) case."""
    for dtype, M, N, K, blocksize, dq, with_bias, grad in cases:
        x, weight, bias = make_case(device, dtype, M, N, K, blocksize, dq, with_bias)
        if grad:
            x.requires_grad_(True)
        args = (x, *ops._weight_args(weight)[:4], bias, *ops._weight_args(weight)[4:])
        torch.library.opcheck(op, args)


def check_compiles_fullgraph(device, rows):
    """nf4_linear_forward at `rows` rows traces into one graph (no break at the route choice)."""
    x, weight, bias = make_case(device, torch.bfloat16, rows, 32, 256)

    def f(x, bias):
        return ops.nf4_linear_forward(x, weight, bias) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, bias), f(x, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients(device):
    check_gradients(gemv, device, rows=3)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    opcheck_op(torch.ops.qlora_ext.nf4_gemv.default, device, [
        (torch.float32, 2, 12, 100, 64, True, True, True),
        (torch.bfloat16, 1, 16, 256, 64, False, False, False),
        (torch.float16, 16, 9, 4128, 128, True, True, False),
        (torch.bfloat16, 3, 5, 64, 32, True, True, True),
    ])  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    check_compiles_fullgraph(device, rows=4)


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    x, weight, bias = make_case(device, torch.bfloat16, 2, 8, 64)
    with pytest.raises(RuntimeError, match=r"x has M = 17 rows"):
        gemv(torch.randn(17, 64, dtype=torch.bfloat16, device=device), weight)
    with pytest.raises(RuntimeError, match=r"x has M = 18 rows"):
        gemv(torch.randn(2, 9, 64, dtype=torch.bfloat16, device=device), weight)
    with pytest.raises(RuntimeError, match=r"x must have K = weight_shape\[1\] = 64"):
        gemv(torch.randn(2, 65, dtype=torch.bfloat16, device=device), weight)
    with pytest.raises(RuntimeError, match=r"x must be float32, float16 or bfloat16"):
        gemv(torch.ones(2, 64, dtype=torch.int32, device=device), weight)
    with pytest.raises(RuntimeError, match=r"x must have at least one dimension"):
        gemv(torch.tensor(1.0, dtype=torch.bfloat16, device=device), weight)
    with pytest.raises(RuntimeError, match=r"bias must have x's dtype"):
        gemv(x, weight, bias.float())
    with pytest.raises(RuntimeError, match=r"bias must be \[N\] = \[8\]"):
        gemv(x, weight, torch.zeros(9, dtype=torch.bfloat16, device=device))
    packed, absmax, blocksize, shape, *nested = ops._weight_args(weight)
    with pytest.raises(RuntimeError, match=r"weight_shape must be \[N, K\]"):
        ops.nf4_gemv(x, packed, absmax, blocksize, [8, 8, 8], None, *nested)
    with pytest.raises(RuntimeError, match=r"packed must have 256 elements"):
        ops.nf4_gemv(x, packed[:-1], absmax, blocksize, shape, None, *nested)
    with pytest.raises(RuntimeError, match=r"blocksize must be a power of two"):
        ops.nf4_gemv(x, packed, absmax, 48, shape, None, *nested)
    with pytest.raises(RuntimeError, match=r"nested_absmax, nested_code and nested_offset go together"):
        ops.nf4_gemv(x, packed, absmax, blocksize, shape, None, nested[0], None, None)


def test_bad_devices():
    x, weight, bias = make_case("cpu", torch.bfloat16, 2, 8, 64)
    if not HAS_CUDA:
        pytest.skip("needs a CUDA build and GPU")
    with pytest.raises(RuntimeError, match=r"packed is on cuda.* but x is on cpu"):
        gemv(x, weight.to("cuda"))
    with pytest.raises(RuntimeError, match=r"bias is on cpu but x is on cuda"):
        gemv(x.cuda(), weight.to("cuda"), bias)
    with pytest.raises(RuntimeError, match=r"absmax is on cpu but packed is on cuda"):
        packed, absmax, blocksize, shape, *nested = ops._weight_args(weight)
        ops.nf4_gemv(x.cuda(), packed.cuda(), absmax, blocksize, shape, None, *[t.cuda() for t in nested[:3]], 256)


# ---- nf4_linear_forward -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("M", [1, 16, 17])
def test_linear_forward(device, dtype, M, caplog):
    x, weight, bias = make_case(device, dtype, M, 24, 512)
    with caplog.at_level(logging.DEBUG, logger="qlora_ext"):
        out = ops.nf4_linear_forward(x, weight, bias)
    assert_close_to_reference(out, x, weight, bias)
    fused = device == "cuda" and dtype != torch.float32
    gemm = "nf4_gemm" if ops.NF4_GEMM_ENABLED else "dequantize + linear"
    expected = ("nf4_gemv" if M <= 16 else gemm) if fused else "dequantize + linear"
    assert any(f"nf4_linear_forward: {expected} " in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_forward_with_grad_takes_dense_route(device, caplog):
    x, weight, bias = make_case(device, torch.bfloat16, 2, 24, 512)
    x.requires_grad_(True)
    with caplog.at_level(logging.DEBUG, logger="qlora_ext"):
        out = ops.nf4_linear_forward(x, weight, bias)
    out.float().sum().backward()
    assert x.grad is not None
    assert any("dequantize + linear" in r.getMessage() for r in caplog.records)


def test_linear_forward_bad_shapes():
    x, weight, bias = make_case("cpu", torch.bfloat16, 2, 8, 64)
    with pytest.raises(ValueError, match="x must be"):
        ops.nf4_linear_forward(torch.zeros(2, 63, dtype=torch.bfloat16), weight)
    w3 = qlora_ext.NF4Weight.from_float(torch.randn(2, 4, 64))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.nf4_linear_forward(x, w3)


def test_variant_from_the_environment(monkeypatch, use_variant):
    """QLORA_NF4_GEMV_VARIANT picks the process's starting variant; a wrong name (or any name in
    a build without CUDA variants) raises naming the variable; unset or empty changes nothing."""
    monkeypatch.delenv(ops.GEMV_VARIANT_ENV, raising=False)
    ops.apply_gemv_variant_from_env()
    monkeypatch.setenv(ops.GEMV_VARIANT_ENV, "")
    ops.apply_gemv_variant_from_env()
    monkeypatch.setenv(ops.GEMV_VARIANT_ENV, "no_such_kernel")
    with pytest.raises(ValueError, match="QLORA_NF4_GEMV_VARIANT='no_such_kernel' is not an nf4_gemv variant"):
        ops.apply_gemv_variant_from_env()
    if VARIANTS:
        use_variant(VARIANTS[0])  # restores the variant in force after the test
        monkeypatch.setenv(ops.GEMV_VARIANT_ENV, VARIANTS[-1])
        ops.apply_gemv_variant_from_env()
        assert ops.nf4_gemv_variant() == VARIANTS[-1]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
@pytest.mark.parametrize("lean", ["factored_lean", "factored_lean_wide"])
@pytest.mark.parametrize("M", [1, 5, 8, 9, 16])
@pytest.mark.parametrize(
    "N,K,double_quant",
    [
        (4096, 4096, True),  # one tile per CTA
        (16 * 1000 + 5, 512, True),  # several tiles per CTA (> 3 per SM on any GPU), rows past N
        (1000, 4160, False),  # plain scales; K not a multiple of the 256-k step
        (48, 64, True),  # one segment
    ],
)
def test_lean_variants_equal_factored_bit_for_bit(lean, M, N, K, double_quant, use_variant):
    # LEAN only folds the part search and selects of the one-weight launch away and runs at 3 CTAs
    # a SM: the same tiles, steps and summation order as "factored", so the same bits.
    x, weight, bias = make_case("cuda", torch.bfloat16, M, N, K, double_quant=double_quant)
    use_variant("factored")
    expected = gemv(x, weight, bias)
    use_variant(lean)
    out = gemv(x, weight, bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert_close_to_reference(out, x, weight, bias)
