"""nf4_gemv_swiglu: the MLP's gate and up NF4 GEMVs with SwiGLU after them, in one op.

Its contract is nf4_gemv_grouped([gate, up]) followed by swiglu, bit for bit: on the CPU and in
every CUDA fallback the op IS those two ops; where CUDA runs one launch (SwiGLU in the GEMV's
epilogue) it rounds gate and up to the dtype as the grouped kernel stores them and applies the
SwiGLU kernels' math, so the bits must still match. It is also held to the fp32 reference
(exact NF4 products, fp32 SwiGLU) against plain PyTorch's error.
"""

from __future__ import annotations

import math

import pytest
import torch

from qlora_ext import block_ops, ops, reference
from test_nf4_gemv import DEVICES, HAS_CUDA, _dtype_id
from test_nf4_gemv import use_variant  # noqa: F401  (fixture)
from test_nf4_gemv_grouped import make_parts, op_args

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")


def two_steps(x, gate, up, bias):
    """The op's definition: the grouped GEMV, then swiglu on its two halves."""
    both = ops.nf4_gemv_grouped_weights(x, [gate, up], bias)
    n = gate.shape[0]
    return block_ops.swiglu(both[..., :n].contiguous(), both[..., n:].contiguous())


def reference_of(x, gate, up, bias):
    return reference.nf4_gemv_swiglu(x.reshape(-1, x.shape[-1]), ops._weight_args(gate), ops._weight_args(up), bias)


def assert_close_to_reference(out, x, gate, up, bias):
    """The op's error against the fp32 reference is within twice plain PyTorch's (dequantize to x's
    dtype, matmul, silu * up in x's dtype) plus an ulp of the output and fp32 summation noise."""
    ref = reference_of(x, gate, up, bias).reshape(out.shape)
    n = gate.shape[0]
    dense = torch.nn.functional.linear(x, torch.cat([gate.dequantize(x.dtype), up.dequantize(x.dtype)]), bias)
    baseline = torch.nn.functional.silu(dense[..., :n]) * dense[..., n:]
    assert torch.isfinite(out).all(), "non-finite output"
    err = (out.float() - ref).abs().max().item()
    base_err = (baseline.float() - ref).abs().max().item()
    w = torch.cat([gate.dequantize(torch.float32), up.dequantize(torch.float32)]).abs()
    dot_scale = (x.float().abs().reshape(-1, x.shape[-1]) @ w.T).max().item()
    order_noise = torch.finfo(torch.float32).eps * math.sqrt(x.shape[-1]) * dot_scale * (1 + dot_scale)
    slack = torch.finfo(x.dtype).eps * ref.abs().max().item() + order_noise + 1e-7
    assert err <= 2 * base_err + slack, f"error {err:.3g} > 2 x PyTorch's {base_err:.3g} + {slack:.2g}"


SHAPES = [  # (N, K): Llama-like, N not a multiple of a tile (8 or 16 outputs), K % 64 == 32 (two steps)
    (96, 4096),
    (45, 192),
    (7, 256),
    (300, 2112),
    (64, 96),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("M", [1, 3, 9, 16])
@pytest.mark.parametrize("N,K", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_equals_grouped_then_swiglu(device, dtype, M, N, K, bias, use_variant):
    use_variant("factored")
    x, (gate, up), b = make_parts(device, dtype, M, (N, N), K, bias=bias)
    out = ops.nf4_gemv_swiglu_weights(x, gate, up, b)
    assert out.shape == (M, N) and out.dtype == dtype
    torch.testing.assert_close(out, two_steps(x, gate, up, b), rtol=0, atol=0)
    assert_close_to_reference(out, x, gate, up, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "plain"])
def test_scale_forms_and_batch_shape(device, double_quant):
    x, (gate, up), b = make_parts(device, torch.bfloat16, 6, (64, 64), 512, double_quant=double_quant)
    x = x.reshape(2, 3, 512)  # leading dimensions are kept
    out = ops.nf4_gemv_swiglu_weights(x, gate, up, b)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out, two_steps(x, gate, up, b), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_every_variant_setting_gives_the_same_bits(device, use_variant):
    # The fused launch always takes "factored"'s tiles; the fallback's grouped GEMV follows the switch.
    x, (gate, up), b = make_parts(device, torch.float16, 1, (128, 128), 1024)
    use_variant("factored")
    expected = two_steps(x, gate, up, b)
    for variant in ops.nf4_gemv_variants() if device == "cuda" else [None]:
        use_variant(variant)
        torch.testing.assert_close(ops.nf4_gemv_swiglu_weights(x, gate, up, b), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_x_and_non_contiguous_x(device):
    x, (gate, up), b = make_parts(device, torch.bfloat16, 4, (32, 32), 128)
    assert ops.nf4_gemv_swiglu_weights(x[:0], gate, up, b).shape == (0, 32)
    strided = torch.randn(128, 4, device=device, dtype=torch.bfloat16).T  # [4, 128], not contiguous
    torch.testing.assert_close(
        ops.nf4_gemv_swiglu_weights(strided, gate, up, b), two_steps(strided.contiguous(), gate, up, b), rtol=0, atol=0
    )


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_x_propagates(device):
    x, (gate, up), b = make_parts(device, torch.bfloat16, 2, (32, 32), 128)
    x[1, 5] = float("nan")
    out = ops.nf4_gemv_swiglu_weights(x, gate, up, b)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


@pytest.mark.not_under_sanitizer  # reads kernel names from torch.profiler (CUPTI)
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
@pytest.mark.parametrize("K,launches", [(256, 1), (96, 3)])  # K % 64 != 0: grouped ("mma", 2 parts) + swiglu
def test_cuda_one_launch_where_it_applies(K, launches, use_variant):
    use_variant("factored")
    x, (gate, up), b = make_parts("cuda", torch.bfloat16, 1, (64, 64), K)
    ops.nf4_gemv_swiglu_weights(x, gate, up, b)  # warm-up outside the profile
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.nf4_gemv_swiglu_weights(x, gate, up, b)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "nf4_gemv" in e.name or "swiglu" in e.name]
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels here (no CUPTI?)")
    assert len(names) == launches, names


@pytest.mark.parametrize("device", DEVICES)
def test_gradients(device):
    x, (gate, up), b = make_parts(device, torch.float32, 3, (32, 32), 128)
    x.requires_grad_(True)
    b.requires_grad_(True)
    h = ops.nf4_gemv_swiglu_weights(x, gate, up, b)
    probe = torch.randn_like(h)
    gx, gb = torch.autograd.grad((h * probe).sum(), (x, b))
    xr, br = x.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    dense = torch.nn.functional.linear(xr, torch.cat([gate.dequantize(torch.float32), up.dequantize(torch.float32)]).double(), br)
    href = torch.nn.functional.silu(dense[:, :32]) * dense[:, 32:]
    gx_ref, gb_ref = torch.autograd.grad((href * probe.double()).sum(), (xr, br))
    torch.testing.assert_close(gx, gx_ref.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, gb_ref.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype, M, N, K, double_quant, bias, grad in [
        (torch.float32, 2, 16, 128, True, True, True),
        (torch.bfloat16, 1, 64, 256, True, False, False),
        (torch.float16, 5, 7, 192, False, True, False),
    ]:
        x, weights, b = make_parts(device, dtype, M, (N, N), K, double_quant=double_quant, bias=bias)
        if grad:
            x.requires_grad_(True)
        torch.library.opcheck(torch.ops.qlora_ext.nf4_gemv_swiglu.default, op_args(x, weights, (N, N), b))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    x, weights, b = make_parts(device, torch.bfloat16, 2, (32, 32, 16), 128)
    op = torch.ops.qlora_ext.nf4_gemv_swiglu
    nested = [w.nested for w in weights]
    packed, absmax = [w.packed for w in weights], [w.absmax for w in weights]
    absmax2, offsets = [n.absmax2 for n in nested], [n.offset.reshape(1) for n in nested]
    code = nested[0].code
    with pytest.raises(RuntimeError, match=r"rows must name two parts \(gate, up\), got 3"):
        op(x, packed, absmax, 64, [32, 32, 16], absmax2, code, offsets, None, 256)
    with pytest.raises(RuntimeError, match=r"gate and up must have equal rows, got rows = \[32, 16\]"):
        op(x, packed[1:], absmax[1:], 64, [32, 16], absmax2[1:], code, offsets[1:], None, 256)
    with pytest.raises(RuntimeError, match=r"bias must be \[sum\(rows\)\] = \[64\]"):
        op(x, packed[:2], absmax[:2], 64, [32, 32], absmax2[:2], code, offsets[:2], b[:32], 256)
    with pytest.raises(RuntimeError, match=r"part 1 \(packed\[1\], absmax\[1\], rows\[1\] = 32\)"):
        op(x, [packed[0], packed[2]], [absmax[0], absmax[2]], 64, [32, 32], [absmax2[0], absmax2[2]], code,
           [offsets[0], offsets[2]], None, 256)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"x has M = 17 rows"):
        op(torch.randn(17, 128, dtype=torch.bfloat16, device=device), packed[:2], absmax[:2], 64, [32, 32],
           absmax2[:2], code, offsets[:2], None, 256)  # fmt: skip
