"""nf4_gemv_grouped: several NF4 weights that multiply one x, their products side by side.

Its contract is nf4_gemv's, part by part: on the CPU and in every CUDA fallback the op IS nf4_gemv
per part and a concatenation; where CUDA runs the parts as one launch, the kernel is the variant's
factored kernel with the same tiles, so the result must equal nf4_gemv's with that variant bit for
bit. Both are also held to the fp32 reference with test_nf4_gemv's tolerance.
"""

from __future__ import annotations

import pytest
import torch

import qlora_ext
from qlora_ext import ops
from test_nf4_gemv import DEVICE_VARIANTS, DEVICES, HAS_CUDA, VARIANTS, _dtype_id, assert_close_to_reference, gemv
from test_nf4_gemv import use_variant  # noqa: F401  (fixture)

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")

# Variants whose kernel the grouped launch uses itself (the others group with "factored").
# The lean ones group with factored_fill's kernels and run their own one-weight kernel part by part,
# so the bit-for-bit comparison below also holds LEAN to the grouped kernel's bits.
FACTORED = {"factored", "factored_split", "factored_r2", "factored_r1", "factored_wide", "factored_o3", "factored_o4",
            "factored_fill", "factored_lean", "factored_lean_wide"}


def make_parts(device, dtype, M, rows, K, double_quant=True, bias=True, blocksize=64):
    gen = torch.Generator().manual_seed(torch.seed() % (2**31))
    weights = [
        qlora_ext.NF4Weight.from_float((torch.randn(n, K, generator=gen) * 0.05).to(device), blocksize, double_quant)
        for n in rows
    ]
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
    b = (torch.randn(sum(rows), generator=gen) * 0.1).to(device=device, dtype=dtype) if bias else None
    return x, weights, b


def op_args(x, weights, rows, bias) -> tuple:
    """The positional arguments of qlora_ext::nf4_gemv_grouped / nf4_gemv_swiglu (one schema) for
    these weights (blocksize 64, nested blocksize 256), either scale form."""
    nested = weights[0].nested
    return (
        x, [w.packed for w in weights], [w.absmax for w in weights], 64, list(rows),
        [w.nested.absmax2 for w in weights] if nested else [], nested.code if nested else None,
        [w.nested.offset.reshape(1) for w in weights] if nested else [], bias, 256,
    )  # fmt: skip


def part_by_part(x, weights, bias):
    """nf4_gemv on each weight with its slice of the bias, concatenated: the op's definition."""
    outputs, first = [], 0
    for w in weights:
        n = w.shape[0]
        outputs.append(gemv(x, w, None if bias is None else bias[first : first + n]))
        first += n
    return torch.cat(outputs, dim=-1)


ROWS = [  # (rows per part, K): q/k/v- and gate/up-like groups, a ragged last part, many parts
    ((64, 32, 32), 256),
    ((96, 32), 4096),
    ((32, 45), 192),  # the last part not a whole tile
    ((128,), 320),  # one part
    ((32, 32, 32, 32), 64),  # the most parts one launch takes
    ((32, 32, 32, 32, 32), 128),  # more: part by part
    ((33, 64), 256),  # a part before the last not a multiple of 32: part by part
    ((64, 32), 96),  # K % 64 == 32: part by part ("mma")
]


@pytest.mark.parametrize("device,variant", DEVICE_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("M", [1, 3, 9, 16])
@pytest.mark.parametrize("rows,K", ROWS, ids=[f"{'-'.join(map(str, r))}x{k}" for r, k in ROWS])
def test_equals_nf4_gemv_part_by_part(device, variant, dtype, M, rows, K, use_variant):
    use_variant(variant if variant in FACTORED or variant is None else "factored")
    x, weights, bias = make_parts(device, dtype, M, rows, K)
    out = ops.nf4_gemv_grouped_weights(x, weights, bias)
    assert out.shape == (M, sum(rows)) and out.dtype == dtype
    torch.testing.assert_close(out, part_by_part(x, weights, bias), rtol=0, atol=0)
    first = 0
    for w in weights:  # and each part is within the reference's tolerance
        n = w.shape[0]
        assert_close_to_reference(out[:, first : first + n], x, w, bias[first : first + n])
        first += n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "plain"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_scale_forms_and_batch_shape(device, double_quant, bias):
    x, weights, b = make_parts(device, torch.bfloat16, 6, (64, 32, 32), 512, double_quant=double_quant, bias=bias)
    x = x.reshape(2, 3, 512)  # leading dimensions are kept
    out = ops.nf4_gemv_grouped_weights(x, weights, b)
    assert out.shape == (2, 3, 128)
    torch.testing.assert_close(out, part_by_part(x, weights, b), rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
def test_fill_shape_is_o3_per_part(use_variant):
    """factored_fill on a group of 2 x SMs + 2 tiles (one round at 3 CTAs a SM, two at 2): the 3-CTA
    shape, i.e. factored_o3's products per part bit for bit, and within the reference's tolerance."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = (32 * (sms + 1) - 64, 32, 32)  # (parts before the last: whole 32-row tiles)
    x, weights, bias = make_parts("cuda", torch.bfloat16, 1, rows, 512)
    use_variant("factored_fill")
    out = ops.nf4_gemv_grouped_weights(x, weights, bias)
    use_variant("factored_o3")
    torch.testing.assert_close(out, part_by_part(x, weights, bias), rtol=0, atol=0)
    first = 0
    for w in weights:
        n = w.shape[0]
        assert_close_to_reference(out[:, first : first + n], x, w, bias[first : first + n])
        first += n


@pytest.mark.parametrize("device", DEVICES)
def test_variant_mma_still_matches(device, use_variant):
    # With a variant that has no grouped form the launch takes "factored": still the reference's.
    if device == "cuda":
        use_variant("mma")
    x, weights, b = make_parts(device, torch.float16, 2, (32, 64), 1024)
    out = ops.nf4_gemv_grouped_weights(x, weights, b)
    first = 0
    for w in weights:
        n = w.shape[0]
        assert_close_to_reference(out[..., first : first + n], x, w, b[first : first + n])
        first += n


@pytest.mark.parametrize("device", DEVICES)
def test_empty_x_and_non_contiguous_x(device):
    x, weights, b = make_parts(device, torch.bfloat16, 4, (32, 32), 128)
    empty = ops.nf4_gemv_grouped_weights(x[:0], weights, b)
    assert empty.shape == (0, 64)
    strided = torch.randn(128, 4, device=device, dtype=torch.bfloat16).T  # [4, 128], not contiguous
    torch.testing.assert_close(
        ops.nf4_gemv_grouped_weights(strided, weights, b), part_by_part(strided.contiguous(), weights, b), rtol=0, atol=0
    )


@pytest.mark.not_under_sanitizer  # reads kernel names from torch.profiler (CUPTI)
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
@pytest.mark.parametrize("rows,launches", [((64, 32, 32), 1), ((96, 45), 1), ((33, 64), 2), ((32,) * 5, 5)])
def test_cuda_one_launch_where_it_applies(rows, launches, use_variant):
    use_variant("factored")
    x, weights, b = make_parts("cuda", torch.bfloat16, 1, rows, 256)
    ops.nf4_gemv_grouped_weights(x, weights, b)  # warm-up outside the profile
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.nf4_gemv_grouped_weights(x, weights, b)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "nf4_gemv" in e.name]
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels here (no CUPTI?)")
    assert len(names) == launches and all("nf4_gemv_factored_kernel" in n for n in names), names


@pytest.mark.parametrize("device", DEVICES)
def test_gradients(device):
    x, weights, b = make_parts(device, torch.float32, 3, (32, 16), 128)
    x.requires_grad_(True)
    b.requires_grad_(True)
    y = ops.nf4_gemv_grouped_weights(x, weights, b)
    probe = torch.randn_like(y)
    gx, gb = torch.autograd.grad((y * probe).sum(), (x, b))
    dense = torch.cat([w.dequantize(torch.float32) for w in weights])
    torch.testing.assert_close(gx, probe @ dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, probe.sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype, M, rows, K, double_quant, bias, grad in [
        (torch.float32, 2, (16, 8), 128, True, True, True),
        (torch.bfloat16, 1, (64, 32, 32), 256, True, False, False),
        (torch.float16, 5, (32, 7), 192, False, True, False),
    ]:
        x, weights, b = make_parts(device, dtype, M, rows, K, double_quant=double_quant, bias=bias)
        if grad:
            x.requires_grad_(True)
        torch.library.opcheck(torch.ops.qlora_ext.nf4_gemv_grouped.default, op_args(x, weights, rows, b))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    x, weights, b = make_parts(device, torch.bfloat16, 2, (32, 16), 128)
    op = torch.ops.qlora_ext.nf4_gemv_grouped
    nested = [w.nested for w in weights]
    packed, absmax = [w.packed for w in weights], [w.absmax for w in weights]
    absmax2, offsets = [n.absmax2 for n in nested], [n.offset.reshape(1) for n in nested]
    code = nested[0].code
    with pytest.raises(RuntimeError, match="rows must name at least one part"):
        op(x, [], [], 64, [], [], code, [], None, 256)
    with pytest.raises(RuntimeError, match=r"packed must hold one tensor per part \(rows has 2"):
        op(x, packed[:1], absmax, 64, [32, 16], absmax2, code, offsets, None, 256)
    with pytest.raises(RuntimeError, match="absmax must hold one tensor per part"):
        op(x, packed, absmax[:1], 64, [32, 16], absmax2, code, offsets, None, 256)
    with pytest.raises(RuntimeError, match="nested_absmax and nested_offset must hold one tensor per part"):
        op(x, packed, absmax, 64, [32, 16], absmax2[:1], code, offsets, None, 256)
    with pytest.raises(RuntimeError, match="rows must be non-negative"):
        op(x, packed, absmax, 64, [-32, 16], absmax2, code, offsets, None, 256)
    with pytest.raises(RuntimeError, match=r"bias must be \[sum\(rows\)\] = \[48\]"):
        op(x, packed, absmax, 64, [32, 16], absmax2, code, offsets, b[:40], 256)
    with pytest.raises(RuntimeError, match="bias must have x's dtype"):
        op(x, packed, absmax, 64, [32, 16], absmax2, code, offsets, b.float(), 256)
    # a part's own error names the part: rows[1] does not match packed[1]'s size
    with pytest.raises(RuntimeError, match=r"part 1 \(packed\[1\], absmax\[1\], rows\[1\] = 17\)"):
        op(x, packed, absmax, 64, [32, 17], absmax2, code, offsets, None, 256)
    with pytest.raises(RuntimeError, match=r"x has M = 17 rows"):
        op(torch.randn(17, 128, dtype=torch.bfloat16, device=device), packed, absmax, 64, [32, 16], absmax2, code,
           offsets, None, 256)  # fmt: skip
    with pytest.raises(ValueError, match="weights must hold at least one NF4Weight"):
        ops.nf4_gemv_grouped_weights(x, [], None)


def test_compatibility_check():
    gen = torch.Generator().manual_seed(3)

    def weight(n, k, blocksize=64, double_quant=True):
        return qlora_ext.NF4Weight.from_float(torch.randn(n, k, generator=gen), blocksize, double_quant)

    assert ops.grouped_gemv_compatible([weight(32, 128), weight(16, 128)])
    assert not ops.grouped_gemv_compatible([])
    assert not ops.grouped_gemv_compatible([weight(32, 128), weight(16, 64)])  # K differs
    assert not ops.grouped_gemv_compatible([weight(32, 128), weight(16, 128, blocksize=128)])
    assert not ops.grouped_gemv_compatible([weight(32, 128), weight(16, 128, double_quant=False)])
    other_map = weight(16, 128)
    other_map.nested.code = other_map.nested.code.clone()
    other_map.nested.code[0] -= 0.5
    assert not ops.grouped_gemv_compatible([weight(32, 128), other_map])
