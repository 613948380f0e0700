"""Fused transformer-block operators (qlora_ext.block_ops: rms_norm, rope, swiglu and their
backwards) against the fp32 references, on every device present; opcheck; autograd; and the model
wiring (qlora_ext.fused_blocks): transformers Llama-family models and the builtin TinyLlama give the
same loss and LoRA gradients with the fused operators as without.

Tolerance follows FlashAttention's rule: the op's error against the fp32 reference may be at most
2x (forward) / 3x (backward) the error of the PyTorch composite computed in the same dtype (the
module code the op replaces), plus one ulp of the output's scale (where PyTorch happens to be
exact) and, for row sums, fp32 summation-order noise.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import qlora_ext
from qlora_ext import block_ops, fused_blocks, reference
from train_helpers import hf_model, randomize_adapters, token_batch

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")

HAS_CUDA = torch.cuda.is_available() and qlora_ext.build_info()["with_cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = torch.ops.qlora_ext
EPS32 = torch.finfo(torch.float32).eps


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def assert_within_rule(out, ref, baseline, factor, extra_slack=0.0, what="output"):
    """max|out - ref| <= factor * max|baseline - ref| + one ulp of out's dtype at ref's scale + extra."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), f"non-finite {what}"
    if ref.numel() == 0:
        return
    err = (out.float() - ref).abs().max().item()
    base = (baseline.float() - ref).abs().max().item()
    slack = torch.finfo(out.dtype).eps * ref.abs().max().item() + extra_slack + 1e-30
    assert err <= factor * base + slack, f"{what}: error {err:.3g} > {factor} x PyTorch's {base:.3g} + {slack:.2g}"


# ---- RMSNorm ------------------------------------------------------------------------------------


def composite_rms_norm(x, weight, eps, cast_before_weight):
    """The PyTorch module code the op replaces, in x's dtype: transformers' LlamaRMSNorm
    (cast_before_weight) or the builtin TinyLlama's RMSNorm."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:
        return weight * normed.to(x.dtype)
    return (normed * weight.float()).to(x.dtype)


def rms_case(device, dtype, shape, weight_dtype=None, scale=1.0):
    x = (torch.randn(shape) * scale).to(device=device, dtype=dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(device=device, dtype=weight_dtype or dtype)
    return x, weight


def rms_sum_slack(x, ref):
    # fp32 summation-order noise of the D-term row sum, relative to the output's scale.
    return EPS32 * math.sqrt(x.shape[-1]) * 4 * ref.abs().max().item() if ref.numel() else 0.0


def rounding_flips(x, weight, eps):
    """|X(x * r_op) - X(x * r_ref)| [rows, D]: with cast_before_weight the normalised row is rounded
    to x's dtype X, and a last-bit difference between the op's and the reference's fp32 row scale
    r (summation order) can move a value to the neighbouring one of X. Exactly those moves."""
    D = x.shape[-1]
    x32 = x.float().reshape(-1, D)
    r_op = OPS.rms_norm(x, weight, eps, True)[1].reshape(-1, 1)
    r_ref = reference.rms_norm(x, weight, eps)[1].reshape(-1, 1)
    return ((x32 * r_op).to(x.dtype).float() - (x32 * r_ref).to(x.dtype).float()).abs()


RMS_SHAPES = [(5, 1), (4, 3), (3, 127), (2, 3, 4097), (1, 64), (0, 32), (7, 1024), (2, 1032)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_matches_reference(device, dtype, shape):
    for cast_before_weight in (True, False):
        for weight_dtype in {dtype, torch.float32}:
            x, weight = rms_case(device, dtype, shape, weight_dtype)
            y, inv_rms = OPS.rms_norm(x, weight, 1e-5, cast_before_weight)
            ref, ref_inv = reference.rms_norm(x, weight, 1e-5, cast_before_weight)
            baseline = composite_rms_norm(x, weight, 1e-5, cast_before_weight)
            assert y.dtype == baseline.dtype, (y.dtype, baseline.dtype)
            assert inv_rms.dtype == torch.float32 and inv_rms.shape == (math.prod(shape[:-1]),)
            slack = rms_sum_slack(x, ref)
            if cast_before_weight and y.numel():
                slack += (weight.float().abs() * rounding_flips(x, weight, 1e-5)).max().item()
            assert_within_rule(y, ref, baseline, 2, slack)
            torch.testing.assert_close(inv_rms, ref_inv, rtol=8 * EPS32 * math.sqrt(shape[-1]), atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_wide_range_and_eps(device):
    # Large and tiny magnitudes (the fp32 sum of squares must not overflow for bf16-sized values),
    # and eps = 0 on a non-zero row.
    for scale in (1e-3, 1e3, 3e4):
        x, weight = rms_case(device, torch.bfloat16, (4, 256), scale=scale)
        y, _ = OPS.rms_norm(x, weight, 0.0, True)
        ref, _ = reference.rms_norm(x, weight, 0.0, True)
        slack = rms_sum_slack(x, ref) + (weight.float().abs() * rounding_flips(x, weight, 0.0)).max().item()
        assert_within_rule(y, ref, composite_rms_norm(x, weight, 0.0, True), 2, slack)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_non_contiguous_and_misaligned(device):
    # Non-contiguous x is copied, so the result equals the contiguous one bit for bit.
    x, weight = rms_case(device, torch.bfloat16, (6, 2 * 264))
    strided = x[:, ::2]
    assert not strided.is_contiguous()
    for a, b in zip(OPS.rms_norm(strided, weight[:264], 1e-6), OPS.rms_norm(strided.contiguous(), weight[:264], 1e-6)):
        assert torch.equal(a, b)
    # x starting one element past an aligned address takes the CUDA kernel's scalar path, which sums
    # the squares in another order than the vector path (seen on the H100: inv_rms one fp32 ulp
    # apart): the same accuracy rule as the aligned input, not the same bits.
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=device)
    shifted = storage[1:].view_as(x)
    shifted.copy_(x)
    y, inv_rms = OPS.rms_norm(shifted, weight, 1e-6, True)
    ref, ref_inv_rms = reference.rms_norm(x, weight, 1e-6, True)
    slack = rms_sum_slack(x, ref) + (weight.float().abs() * rounding_flips(x, weight, 1e-6)).max().item()
    assert_within_rule(y, ref, composite_rms_norm(x, weight, 1e-6, True), 2, slack)
    torch.testing.assert_close(inv_rms, ref_inv_rms.reshape(inv_rms.shape), rtol=EPS32 * math.sqrt(x.shape[-1]), atol=0)


def test_rms_norm_matches_transformers_module():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(96, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(96))
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16)
    y = block_ops.rms_norm(x, norm.weight, norm.variance_epsilon)
    expected = norm(x)
    # Same rounding order; only the fp32 reduction order of mean(x²) differs, which can move a
    # value across a bf16 rounding boundary: at most one bf16 ulp, rarely.
    assert y.dtype == expected.dtype
    ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs()
    assert ((y.float() - expected.float()).abs() <= ulp).all()
    assert (y == expected).float().mean() > 0.95


def rms_dx_slack(x, weight, dy, eps):
    """fp32 summation-order noise of dx = r·(g − n·mean(g·n)) (g = dy·w, n = x·r), relative to the
    scale of its terms, not of dx: where the two terms cancel (D = 1, or rows whose mean(x²) is of
    eps's order) dx is far smaller than what was summed to get it, and any other summation order
    (the kernels', the composite's) differs from the reference by an ulp of the terms."""
    if x.numel() == 0:
        return 0.0
    D = x.shape[-1]
    r = reference.rms_norm(x, weight, eps)[1].reshape(-1, 1)
    n = x.float().reshape(-1, D) * r
    g = dy.float().reshape(-1, D) * weight.float()
    terms = r * (g.abs() + n.abs() * (g * n).abs().mean(-1, keepdim=True))
    return 4 * EPS32 * math.sqrt(D) * terms.max().item()


def rms_grads(fn, x, weight, dy):
    x = x.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    fn(x, weight).backward(dy)
    return x.grad, weight.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(6, 3), (3, 127), (2, 5, 1032), (1, 4097), (300, 64), (0, 16)], ids=str)
def test_rms_norm_gradients(device, dtype, shape):
    for cast_before_weight in (True, False):
        for weight_dtype in {dtype, torch.float32}:
            x, weight = rms_case(device, dtype, shape, weight_dtype)
            out_dtype = torch.promote_types(dtype, weight_dtype) if cast_before_weight else dtype
            dy = torch.randn(shape, device=device).to(out_dtype)
            dx, dw = rms_grads(lambda a, w: block_ops.rms_norm(a, w, 1e-5, cast_before_weight), x, weight, dy)
            # fp32 reference (its rounding of the normalised row in x's dtype included)
            dx_ref, dw_ref = rms_grads(
                lambda a, w: reference.rms_norm(a, w, 1e-5, cast_before_weight, input_dtype=dtype)[0],
                x.float(), weight.float(), dy.float(),
            )
            dx_base, dw_base = rms_grads(lambda a, w: composite_rms_norm(a, w, 1e-5, cast_before_weight), x, weight, dy)
            assert dx.dtype == dtype and dw.dtype == weight_dtype
            rows = math.prod(shape[:-1])
            assert_within_rule(dx, dx_ref, dx_base, 3, rms_dx_slack(x, weight, dy, 1e-5), "dx")
            # dweight sums `rows` products in fp32, of the rounded normalised rows (rounding_flips)
            dw_slack = EPS32 * rows * dw_ref.abs().max().item()
            if cast_before_weight and rows:
                flips = rounding_flips(x, weight, 1e-5)
                dw_slack += (dy.float().reshape(flips.shape).abs() * flips).sum(0).max().item()
            assert_within_rule(dw, dw_ref, dw_base, 3, dw_slack, "dweight")


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_closed_form_reference_matches_autograd(device):
    x, weight = rms_case(device, torch.float32, (9, 77))
    dy = torch.randn(9, 77, device=device)
    for cast_before_weight in (True, False):
        dx_auto, dw_auto = rms_grads(lambda a, w: reference.rms_norm(a, w, 1e-6, cast_before_weight)[0], x, weight, dy)
        _, inv = reference.rms_norm(x, weight, 1e-6)
        dx, dw = reference.rms_norm_backward(dy, x, weight, inv, cast_before_weight)
        torch.testing.assert_close(dx, dx_auto, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dw, dw_auto, rtol=1e-5, atol=1e-5)
        # and the backward op against it directly
        dx_op, dw_op = OPS.rms_norm_backward(dy, x, weight, inv, cast_before_weight, True)
        torch.testing.assert_close(dx_op, dx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dw_op, dw, rtol=1e-5, atol=1e-5)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_weight_gradient_only_when_needed(device):
    x, weight = rms_case(device, torch.bfloat16, (4, 64))
    x.requires_grad_(True)
    with _RecordOps() as record:
        block_ops.rms_norm(x, weight).sum().backward()  # the weight is frozen
    backward_calls = [args for func, args in record.calls if func is OPS.rms_norm_backward.default]
    assert len(backward_calls) == 1 and backward_calls[0][5] is False  # compute_dweight
    assert weight.grad is None and x.grad is not None
    # inv_rms (non-differentiable) gets no zero gradient filled in: one launch fewer a norm
    fills = [func for func, _ in record.calls if "zero" in func.__name__ or "fill" in func.__name__]
    assert not fills, fills
    dx, dw = OPS.rms_norm_backward(torch.ones_like(x), x.detach(), weight, OPS.rms_norm(x, weight, 1e-6)[1], True, False)
    assert dw.numel() == 0 and dx.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_deterministic(device):
    x, weight = rms_case(device, torch.bfloat16, (513, 1024))
    dy = torch.randn(513, 1024, device=device, dtype=torch.bfloat16)
    _, inv = OPS.rms_norm(x, weight, 1e-6)
    first = OPS.rms_norm_backward(dy, x, weight, inv, True, True)
    for a, b in zip(first, OPS.rms_norm_backward(dy, x, weight, inv, True, True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_bad_inputs(device):
    x, weight = rms_case(device, torch.bfloat16, (4, 8))
    with pytest.raises(RuntimeError, match="weight must be \\[D\\] = \\[8\\]"):
        OPS.rms_norm(x, weight[:7], 1e-6)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        OPS.rms_norm(x.to(torch.int32), weight, 1e-6)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        OPS.rms_norm(x, weight.half(), 1e-6)
    with pytest.raises(RuntimeError, match="eps must be a finite number >= 0"):
        OPS.rms_norm(x, weight, -1.0)
    with pytest.raises(RuntimeError, match="at least one dimension"):
        OPS.rms_norm(x[0, 0], weight[:1], 1e-6)
    with pytest.raises(RuntimeError, match="at least one element in its last dimension"):
        OPS.rms_norm(x[:, :0], weight[:0], 1e-6)
    _, inv = OPS.rms_norm(x, weight, 1e-6)
    with pytest.raises(RuntimeError, match="dy must have the forward output's dtype"):
        OPS.rms_norm_backward(x.float(), x, weight, inv, True, True)
    with pytest.raises(RuntimeError, match="inv_rms must have one value per row"):
        OPS.rms_norm_backward(x, x, weight, inv[:3], True, True)
    with pytest.raises(RuntimeError, match="dy must have x's shape"):
        OPS.rms_norm_backward(x[:3], x, weight, inv, True, True)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
            OPS.rms_norm(x, weight.cpu(), 1e-6)


# ---- RoPE ---------------------------------------------------------------------------------------


def rope_tables(B, T, Dh, dtype, device, theta=10000.0):
    """cos, sin [B, T, Dh] as transformers' LlamaRotaryEmbedding returns them (halves equal),
    positions offset per batch row so that the batch dimension matters."""
    inv_freq = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh)
    positions = torch.arange(T, dtype=torch.float32)[None] + 7 * torch.arange(B, dtype=torch.float32)[:, None]
    freqs = positions[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def rope_case(device, dtype, B, Hq, Hk, T, Dh, layout="bhtd", cos_batch=1, table_dtype=None):
    """q [B, Hq, T, Dh], k [B, Hk, T, Dh]; layout "bthd" makes them transposed views of
    [B, T, H, Dh] tensors, as transformers' attention does."""
    def make(H):
        if layout == "bthd":
            return torch.randn(B, T, H, Dh).to(device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(B, H, T, Dh).to(device=device, dtype=dtype)

    cos, sin = rope_tables(cos_batch, T, Dh, table_dtype or dtype, device)
    return make(Hq), make(Hk), cos, sin


def composite_rope(x, cos, sin):
    """transformers' apply_rotary_pos_emb for one tensor: x*cos + rotate_half(x)*sin, in the
    promoted dtype of x and the tables, rounded to x's dtype."""
    return (x * cos.unsqueeze(1) + reference.rotate_half(x) * sin.unsqueeze(1)).to(x.dtype)


ROPE_SHAPES = [  # (B, Hq, Hk, T, Dh)
    (2, 4, 2, 7, 16),
    (1, 3, 1, 5, 2),
    (2, 2, 2, 3, 6),
    (1, 8, 2, 33, 128),
    (3, 1, 1, 1, 64),
    (1, 2, 1, 9, 20),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_rope_matches_reference(device, dtype, shape, layout):
    B, Hq, Hk, T, Dh = shape
    for cos_batch in (1, B):
        for table_dtype in {dtype, torch.float32}:
            q, k, cos, sin = rope_case(device, dtype, B, Hq, Hk, T, Dh, layout, cos_batch, table_dtype)
            q_out, k_out = OPS.rope(q, k, cos, sin, False)
            assert q_out.stride() == q.stride() and k_out.stride() == k.stride()
            q_ref, k_ref = reference.rope(q, k, cos, sin)
            for out, ref, x in ((q_out, q_ref, q), (k_out, k_ref, k)):
                baseline = composite_rope(x, cos, sin)
                if dtype == torch.float32 or table_dtype == torch.float32:
                    # fp32 math without FMA, one rounding: PyTorch's fp32 composite bit for bit
                    assert torch.equal(out, baseline)
                else:
                    assert_within_rule(out, ref, baseline, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_rope_inplace_transpose_and_inverse(device, dtype):
    q, k, cos, sin = rope_case(device, dtype, 2, 4, 2, 11, 64, "bthd")
    q_out, k_out = OPS.rope(q, k, cos, sin, False)
    q2, k2 = q.clone(), k.clone()  # clones keep the [B, T, H, Dh] storage order
    ptr = q2.data_ptr()
    block_ops.rope_(q2, k2, cos, sin)
    assert q2.data_ptr() == ptr and q2.stride() == q.stride()
    assert torch.equal(q2, q_out) and torch.equal(k2, k_out)
    # The transposed map is the reference's (same fp32 operations, one rounding: within half an
    # ulp), and with these tables it undoes the rotation.
    qt, kt = OPS.rope(q, k, cos, sin, True)
    qt_ref, kt_ref = reference.rope(q, k, cos, sin, transpose=True)
    torch.testing.assert_close(qt.float(), qt_ref, rtol=torch.finfo(dtype).eps, atol=1e-30)
    torch.testing.assert_close(kt.float(), kt_ref, rtol=torch.finfo(dtype).eps, atol=1e-30)
    q32, k32 = q.float(), k.float()
    cos32, sin32 = rope_tables(1, 11, 64, torch.float32, device)  # fp32 tables: cos² + sin² = 1
    back_q, back_k = OPS.rope(*OPS.rope(q32, k32, cos32, sin32, False), cos32, sin32, True)
    torch.testing.assert_close(back_q, q32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back_k, k32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_empty_one_row_and_odd_strides(device):
    for B, Hq, Hk, T in [(0, 2, 1, 4), (2, 2, 1, 0), (1, 1, 1, 1)]:
        q, k, cos, sin = rope_case(device, torch.bfloat16, B, Hq, Hk, T, 8)
        q_out, k_out = OPS.rope(q, k, cos, sin, False)
        assert q_out.shape == q.shape and k_out.shape == k.shape
        if q.numel():
            q_ref, _ = reference.rope(q, k, cos, sin)
            assert_within_rule(q_out, q_ref, composite_rope(q, cos, sin), 2)
    # A head dimension that is not the innermost in memory is copied (functional op only), a
    # slice of a fused QKV projection is read in place.
    q, k, cos, sin = rope_case(device, torch.float32, 2, 3, 1, 5, 8)
    permuted = q.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert permuted.stride(-1) != 1
    assert torch.equal(OPS.rope(permuted, k, cos, sin, False)[0], OPS.rope(q, k, cos, sin, False)[0])
    qkv = torch.randn(2, 5, 3 + 1 + 1, 8, device=device)  # [B, T, Hq + Hk + Hv, Dh]
    q_s, k_s = qkv[:, :, :3].transpose(1, 2), qkv[:, :, 3:4].transpose(1, 2)
    expected = OPS.rope(q_s.contiguous(), k_s.contiguous(), cos, sin, False)
    v_before = qkv[:, :, 4:].clone()
    block_ops.rope_(q_s, k_s, cos, sin)
    assert torch.equal(q_s, expected[0]) and torch.equal(k_s, expected[1])
    assert torch.equal(qkv[:, :, 4:], v_before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_rope_gradients(device, dtype):
    q, k, cos, sin = rope_case(device, dtype, 2, 4, 2, 9, 32, "bthd")
    dq, dk = torch.randn(q.shape, device=device).to(dtype), torch.randn(k.shape, device=device).to(dtype)

    def grads(fn, q, k):
        q = q.detach().requires_grad_(True)
        k = k.detach().requires_grad_(True)
        q_out, k_out = fn(q, k)
        torch.autograd.backward([q_out, k_out], [dq.to(q_out.dtype), dk.to(k_out.dtype)])
        return q.grad, k.grad

    gq, gk = grads(lambda a, b: block_ops.rope(a, b, cos, sin), q, k)
    gq_ref, gk_ref = grads(lambda a, b: reference.rope(a, b, cos, sin), q.float(), k.float())
    gq_base, gk_base = grads(lambda a, b: (composite_rope(a, cos, sin), composite_rope(b, cos, sin)), q, k)
    assert gq.dtype == dtype
    assert_within_rule(gq, gq_ref, gq_base, 3, what="dq")
    assert_within_rule(gk, gk_ref, gk_base, 3, what="dk")
    # one output unused: its gradient is zero
    q_only = q.detach().requires_grad_(True)
    block_ops.rope(q_only, k, cos, sin)[0].backward(dq)
    assert_within_rule(q_only.grad, gq_ref, gq_base, 3, what="dq alone")


@pytest.mark.parametrize("device", DEVICES)
def test_rope_inplace_needs_no_grad_and_apply_rope_picks(device):
    q, k, cos, sin = rope_case(device, torch.float32, 1, 2, 1, 4, 8)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="use qlora_ext.block_ops.rope"):
        block_ops.rope_(q, k, cos, sin)
    q_out, _ = block_ops.apply_rope(q, k, cos, sin)
    assert q_out.requires_grad and q_out.data_ptr() != q.data_ptr()
    with torch.no_grad():
        q2 = q.detach().clone()
        q_out2, _ = block_ops.apply_rope(q2, k.clone(), cos, sin)
    assert q_out2.data_ptr() == q2.data_ptr()
    torch.testing.assert_close(q_out2, q_out.detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cos and sin get no gradient"):
        block_ops.rope(q, k, cos.requires_grad_(True), sin)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_bad_inputs(device):
    q, k, cos, sin = rope_case(device, torch.bfloat16, 2, 4, 2, 5, 8)
    with pytest.raises(RuntimeError, match="q must be \\[B, Hq, T, Dh\\]"):
        OPS.rope(q[0], k, cos, sin, False)
    with pytest.raises(RuntimeError, match="k must be \\[B, Hk, T, Dh\\] with q's B, T, Dh"):
        OPS.rope(q, k[:, :, :4], cos, sin, False)
    with pytest.raises(RuntimeError, match="must be even"):
        OPS.rope(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7], False)
    with pytest.raises(RuntimeError, match="cos must be \\[1 or B, T, Dh\\]"):
        OPS.rope(q, k, cos[:, :4], sin[:, :4], False)
    with pytest.raises(RuntimeError, match="cos and sin must have q's dtype"):
        OPS.rope(q, k, cos.half(), sin.half(), False)
    with pytest.raises(RuntimeError, match="k must have q's dtype"):
        OPS.rope(q, k.float(), cos, sin, False)
    with pytest.raises(RuntimeError, match="q must have unit stride along Dh"):
        OPS.rope_(q.transpose(2, 3).contiguous().transpose(2, 3), k, cos, sin, False)
    with pytest.raises(RuntimeError, match="q and k share memory"):
        OPS.rope_(q, q, cos, sin, False)
    expanded = torch.randn(1, 1, 5, 8, device=device, dtype=q.dtype).expand(2, 4, 5, 8)
    with pytest.raises(RuntimeError, match="q has elements that share memory"):
        OPS.rope_(expanded, k, cos, sin, False)


# ---- SwiGLU -------------------------------------------------------------------------------------


def composite_swiglu(gate, up):
    return F.silu(gate) * up


SWIGLU_SHAPES = [(1,), (3,), (127,), (4097,), (0, 5), (2, 3, 65), (16, 344)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_swiglu_matches_reference(device, dtype, shape):
    gate = (3 * torch.randn(shape)).to(device=device, dtype=dtype)
    up = torch.randn(shape).to(device=device, dtype=dtype)
    h = OPS.swiglu(gate, up, False)
    assert h.dtype == dtype
    # exp in the kernels may differ from PyTorch's by an fp32 ulp or two
    assert_within_rule(h, reference.swiglu(gate, up), composite_swiglu(gate, up), 2,
                       4 * EPS32 * reference.swiglu(gate, up).abs().max().item() if h.numel() else 0.0)  # fmt: skip
    dh = torch.randn(shape).to(device=device, dtype=dtype)
    dgate, dup = OPS.swiglu_backward(dh, gate, up)
    dgate_ref, dup_ref = reference.swiglu_backward(dh, gate, up)
    g_b, u_b = gate.detach().requires_grad_(True), up.detach().requires_grad_(True)
    composite_swiglu(g_b, u_b).backward(dh)
    slack = 8 * EPS32 * (dgate_ref.abs().max().item() if dgate.numel() else 0.0)
    assert_within_rule(dgate, dgate_ref, g_b.grad, 3, slack, "dgate")
    assert_within_rule(dup, dup_ref, u_b.grad, 3, slack, "dup")
    # the in-place backward writes the same values over gate and up
    g2, u2 = gate.clone(), up.clone()
    OPS.swiglu_backward_(dh, g2, u2)
    assert torch.equal(g2, dgate) and torch.equal(u2, dup)


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_extremes_and_misaligned(device):
    gate = torch.tensor([-1e4, -100.0, -20.0, -1e-8, 0.0, 1e-8, 20.0, 100.0, 1e4], device=device)
    up = torch.linspace(-2, 2, 9, device=device)
    torch.testing.assert_close(OPS.swiglu(gate, up, False), reference.swiglu(gate, up), rtol=1e-6, atol=1e-30)
    dgate, dup = OPS.swiglu_backward(torch.ones_like(gate), gate, up)
    dgate_ref, dup_ref = reference.swiglu_backward(torch.ones_like(gate), gate, up)
    torch.testing.assert_close(dgate, dgate_ref, rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(dup, dup_ref, rtol=1e-5, atol=1e-30)
    # storage offset of one element: the CUDA kernel's scalar path; non-contiguous: a copy
    base = torch.randn(2, 1001, device=device, dtype=torch.bfloat16)
    g, u = base[0, 1:], base[1, 1:]
    assert torch.equal(OPS.swiglu(g, u, False), OPS.swiglu(g.clone(), u.clone(), False))
    gt = torch.randn(40, 24, device=device).T
    assert torch.equal(OPS.swiglu(gt, gt * 2, False), OPS.swiglu(gt.contiguous(), gt.contiguous() * 2, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_swiglu_autograd_and_inplace_backward(device, dtype):
    x = torch.randn(6, 32, device=device, dtype=dtype)
    w_gate = torch.randn(40, 32, device=device, dtype=dtype, requires_grad=True)
    w_up = torch.randn(40, 32, device=device, dtype=dtype, requires_grad=True)
    dh = torch.randn(6, 40, device=device, dtype=dtype)

    def run(inplace):
        for w in (w_gate, w_up):
            w.grad = None
        gate, up = x @ w_gate.T, x @ w_up.T  # dead after swiglu: matmul keeps its inputs, not outputs
        h = block_ops.swiglu(gate, up, backward_inplace=inplace)
        seen = {}

        def record(grad):
            seen["dgate_ptr"] = grad.data_ptr()

        gate.register_hook(record)
        h.backward(dh)
        return w_gate.grad.clone(), w_up.grad.clone(), seen["dgate_ptr"], gate.data_ptr()

    g_functional, u_functional, dgate_ptr, gate_ptr = run(False)
    assert dgate_ptr != gate_ptr
    g_inplace, u_inplace, dgate_ptr, gate_ptr = run(True)
    assert dgate_ptr == gate_ptr  # dgate was written over gate's storage
    assert torch.equal(g_inplace, g_functional) and torch.equal(u_inplace, u_functional)
    # against autograd through the reference
    gate = (x @ w_gate.T).detach()
    up = (x @ w_up.T).detach()
    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    g1, u1 = leaf(gate), leaf(up)
    block_ops.swiglu(g1, u1).backward(dh)
    g2, u2 = leaf(gate.float()), leaf(up.float())
    reference.swiglu(g2, u2).backward(dh.float())
    g3, u3 = leaf(gate), leaf(up)
    composite_swiglu(g3, u3).backward(dh)
    slack = 8 * EPS32 * g2.grad.abs().max().item()
    assert_within_rule(g1.grad, g2.grad, g3.grad, 3, slack, "dgate")
    assert_within_rule(u1.grad, u2.grad, u3.grad, 3, slack, "dup")


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_inplace_backward_falls_back_for_shared_buffers(device):
    # gate and up as halves of one fused projection: the backward must not write over them.
    fused = torch.randn(4, 2, 16, device=device, requires_grad=True)
    gate, up = fused[:, 0], fused[:, 1]
    block_ops.swiglu(gate, up, backward_inplace=True).sum().backward()
    expected = torch.stack(reference.swiglu_backward(torch.ones(4, 16, device=device), gate.detach(), up.detach()), 1)
    torch.testing.assert_close(fused.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_bad_inputs(device):
    gate = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match="up must have gate's shape"):
        OPS.swiglu(gate, gate[:3], False)
    with pytest.raises(RuntimeError, match="up must have gate's dtype"):
        OPS.swiglu(gate, gate.half(), False)
    with pytest.raises(RuntimeError, match="gate must be float32, float16 or bfloat16"):
        OPS.swiglu(gate.long(), gate.long(), False)
    with pytest.raises(RuntimeError, match="dh must have gate's shape"):
        OPS.swiglu_backward(gate[:2], gate, gate.clone())
    with pytest.raises(RuntimeError, match="gate must be contiguous"):
        OPS.swiglu_backward_(gate.T.contiguous(), gate.T, gate.T.clone())
    with pytest.raises(RuntimeError, match="gate and up share memory"):
        OPS.swiglu_backward_(gate.clone(), gate, gate)
    with pytest.raises(RuntimeError, match="dh and gate share memory"):
        OPS.swiglu_backward_(gate, gate, gate.clone())


# ---- SwiGLU of column-scaled operands (DoRA) ------------------------------------------------------

SCALED_SHAPES = [(1, 1), (3, 7), (2, 5, 16), (4, 1000), (0, 8), (3, 4097)]


def _scaled_case(device, dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (3 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
    up = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    gate_scale = (torch.rand(shape[-1], generator=g) + 0.5).to(device=device, dtype=dtype)
    up_scale = (torch.rand(shape[-1], generator=g) + 0.5).to(device=device, dtype=dtype)
    return gate, up, gate_scale, up_scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SCALED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_swiglu_scaled_is_swiglu_of_the_column_scaled_operands(device, dtype, shape):
    """Bit for bit what the unscaled kernels give on dora_column_scale's outputs (the rounded
    products c ⊙ z), forward and backward; and within the rule of the fp32 reference."""
    from qlora_ext import dora  # noqa: PLC0415

    gate, up, gate_scale, up_scale = _scaled_case(device, dtype, shape)
    g, u = dora.dora_column_scale(gate, gate_scale), dora.dora_column_scale(up, up_scale)
    assert torch.equal(g, reference.column_scaled(gate, gate_scale))
    h = OPS.swiglu_scaled(gate, up, gate_scale, up_scale)
    assert h.dtype == dtype and h.shape == gate.shape
    assert torch.equal(h, OPS.swiglu(g, u, False))
    dh = torch.randn(shape).to(device=device, dtype=dtype)
    dg, du = OPS.swiglu_scaled_backward(dh, gate, up, gate_scale, up_scale)
    want_dg, want_du = OPS.swiglu_backward(dh, g, u)
    assert torch.equal(dg, want_dg) and torch.equal(du, want_du)
    ref_dg, ref_du = reference.swiglu_scaled_backward(dh, gate, up, gate_scale, up_scale)
    slack = 8 * EPS32 * (ref_dg.abs().max().item() if dg.numel() else 0.0)
    g_b, u_b = g.detach().requires_grad_(True), u.detach().requires_grad_(True)
    composite_swiglu(g_b, u_b).backward(dh)
    assert_within_rule(dg, ref_dg, g_b.grad, 3, slack, "dg")
    assert_within_rule(du, ref_du, u_b.grad, 3, slack, "du")


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_scaled_strided_and_misaligned(device):
    """Offset views (the CUDA kernel's scalar path), a scale that is a view, non-contiguous
    operands (copied), and a row length that is not a multiple of the vector width."""
    base = torch.randn(2, 1 + 3 * 24, device=device, dtype=torch.bfloat16)
    gate, up = base[0, 1:].view(3, 24), base[1, 1:].view(3, 24)
    scales = torch.rand(2, 25, device=device, dtype=torch.bfloat16) + 0.5
    gs, us = scales[0, 1:], scales[1, 1:]
    want = OPS.swiglu_scaled(gate.clone(), up.clone(), gs.clone(), us.clone())
    assert torch.equal(OPS.swiglu_scaled(gate, up, gs, us), want)
    gt = torch.randn(40, 24, device=device).T
    s = torch.rand(40, device=device) + 0.5
    assert torch.equal(OPS.swiglu_scaled(gt, gt * 2, s, s), OPS.swiglu_scaled(gt.contiguous(), gt.contiguous() * 2, s, s))
    odd = _scaled_case(device, torch.float16, (5, 13))
    assert torch.equal(OPS.swiglu_scaled(*odd), OPS.swiglu(reference.column_scaled(odd[0], odd[2]),
                                                            reference.column_scaled(odd[1], odd[3]), False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_swiglu_scaled_autograd(device, dtype):
    """block_ops.swiglu_scaled's gradients in all four inputs match autograd through the reference
    (the rounding of the scaled operands taken as identity, as dora's backward does)."""
    gate, up, gate_scale, up_scale = _scaled_case(device, dtype, (6, 40), seed=3)
    dh = torch.randn(6, 40).to(device=device, dtype=dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in (gate, up, gate_scale, up_scale)]
    block_ops.swiglu_scaled(*leaves).backward(dh)
    ref = [t.detach().double().requires_grad_(True) for t in (gate, up, gate_scale, up_scale)]
    g, u = ref[0] * ref[2], ref[1] * ref[3]
    (F.silu(g) * u).backward(dh.double())
    for name, got, want in zip(("gate", "up", "gate_scale", "up_scale"), leaves, ref):
        assert got.grad.dtype == dtype
        tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
        scale = want.grad.abs().max().item()
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_scaled_bad_inputs(device):
    gate = torch.randn(4, 8, device=device)
    scale = torch.rand(8, device=device)
    with pytest.raises(RuntimeError, match=r"gate_scale must be \[I\] = \[8\]"):
        OPS.swiglu_scaled(gate, gate.clone(), scale[:7], scale)
    with pytest.raises(RuntimeError, match=r"up_scale must be \[I\] = \[8\]"):
        OPS.swiglu_scaled(gate, gate.clone(), scale, scale.reshape(2, 4))
    with pytest.raises(RuntimeError, match="gate_scale must have gate's dtype"):
        OPS.swiglu_scaled(gate, gate.clone(), scale.half(), scale)
    with pytest.raises(RuntimeError, match="up must have gate's shape"):
        OPS.swiglu_scaled(gate, gate[:3], scale, scale)
    with pytest.raises(RuntimeError, match="dh must have gate's shape"):
        OPS.swiglu_scaled_backward(gate[:2], gate, gate.clone(), scale, scale)
    with pytest.raises(RuntimeError, match="gate must be .* I >= 1"):
        OPS.swiglu_scaled(torch.randn(4, 0, device=device), torch.randn(4, 0, device=device), scale[:0], scale[:0])
    if HAS_CUDA:
        with pytest.raises(RuntimeError, match="gate_scale is on"):
            OPS.swiglu_scaled(gate, gate.clone(), scale.to("cpu" if device == "cuda" else "cuda"), scale)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_swiglu_scaled(device):
    for dtype, shape, grad in [(torch.float32, (3, 20), True), (torch.bfloat16, (2, 3, 9), False), (torch.float16, (33,), True)]:
        gate, up, gate_scale, up_scale = _scaled_case(device, dtype, shape)
        args = [t.requires_grad_(grad) for t in (gate, up, gate_scale, up_scale)]
        torch.library.opcheck(OPS.swiglu_scaled.default, tuple(args))
        dh = torch.randn(shape, device=device, dtype=dtype)
        torch.library.opcheck(OPS.swiglu_scaled_backward.default, (dh, *(t.detach() for t in args)))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_cuda_matches_cpu_kernels(dtype):
    # RoPE does the same fp32 operations in the same order on both devices: bit for bit. RMSNorm
    # sums rows in another order and SwiGLU's exp differs by an ulp: within one ulp of the output.
    q, k, cos, sin = rope_case("cpu", dtype, 2, 4, 2, 33, 128, "bthd", table_dtype=torch.float32)
    for got, want in zip(OPS.rope(q.cuda(), k.cuda(), cos.cuda(), sin.cuda(), False), OPS.rope(q, k, cos, sin, False)):
        assert torch.equal(got.cpu(), want)
    ulp = dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    x, weight = rms_case("cpu", dtype, (37, 4096))
    (y_cuda, inv_cuda), (y_cpu, inv_cpu) = OPS.rms_norm(x.cuda(), weight.cuda(), 1e-5, True), OPS.rms_norm(x, weight, 1e-5, True)
    torch.testing.assert_close(inv_cuda.cpu(), inv_cpu, rtol=8 * EPS32 * math.sqrt(4096), atol=0)
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=2 * torch.finfo(dtype).eps + 8 * EPS32 * math.sqrt(4096), atol=1e-6)
    gate, up = torch.randn(3, 1000).to(dtype), torch.randn(3, 1000).to(dtype)
    torch.testing.assert_close(OPS.swiglu(gate.cuda(), up.cuda(), False).cpu(), OPS.swiglu(gate, up, False), **ulp)
    # the scaled operands are the same rounded products on both devices: within SwiGLU's ulp
    for shape in ((3, 1000), (2, 13)):  # vector path (1000 % 8 == 0) and scalar path
        case = _scaled_case("cpu", dtype, shape)
        torch.testing.assert_close(OPS.swiglu_scaled(*(t.cuda() for t in case)).cpu(), OPS.swiglu_scaled(*case), **ulp)
        dh = torch.randn(shape).to(dtype)
        for got, want in zip(OPS.swiglu_scaled_backward(dh.cuda(), *(t.cuda() for t in case)),
                             OPS.swiglu_scaled_backward(dh, *case)):  # fmt: skip
            torch.testing.assert_close(got.cpu(), want, rtol=4 * torch.finfo(dtype).eps, atol=1e-6)


# ---- registration, opcheck ------------------------------------------------------------------------

ALL_OPS = ["rms_norm", "rms_norm_backward", "rope", "rope_", "rope_append_kv_", "swiglu", "swiglu_backward", "swiglu_backward_"]


@pytest.mark.parametrize("name", ALL_OPS)
def test_kernels_registered(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qlora_ext::{name}", "CPU")
    if HAS_CUDA:  # a CUDA build must dispatch to its own kernel, never fall back silently
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qlora_ext::{name}", "CUDA")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_rms_norm(device):
    for dtype, weight_dtype, shape, cast, grad in [
        (torch.float32, torch.float32, (3, 17), True, True),
        (torch.bfloat16, torch.bfloat16, (2, 3, 64), True, False),
        (torch.bfloat16, torch.float32, (5, 40), True, True),
        (torch.float16, torch.float32, (4, 24), False, True),
    ]:
        x, weight = rms_case(device, dtype, shape, weight_dtype)
        x.requires_grad_(grad)
        weight.requires_grad_(grad)
        torch.library.opcheck(OPS.rms_norm.default, (x, weight, 1e-5, cast))
        out_dtype = torch.promote_types(dtype, weight_dtype) if cast else dtype
        dy = torch.randn(shape, device=device).to(out_dtype)
        _, inv = OPS.rms_norm(x.detach(), weight.detach(), 1e-5, cast)
        for compute_dweight in (True, False):
            torch.library.opcheck(OPS.rms_norm_backward.default, (dy, x.detach(), weight.detach(), inv, cast, compute_dweight))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_rope(device):
    for dtype, shape, layout, table_dtype, grad in [
        (torch.float32, (2, 4, 2, 5, 8), "bthd", torch.float32, True),
        (torch.bfloat16, (1, 2, 1, 3, 16), "bhtd", torch.float32, False),
        (torch.float16, (2, 2, 2, 4, 6), "bhtd", torch.float16, True),
    ]:
        q, k, cos, sin = rope_case(device, dtype, *shape, layout=layout, table_dtype=table_dtype)
        torch.library.opcheck(OPS.rope_.default, (q.clone(), k.clone(), cos, sin, False))
        q.requires_grad_(grad)
        k.requires_grad_(grad)
        for transpose in (False, True):
            torch.library.opcheck(OPS.rope.default, (q, k, cos, sin, transpose))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_swiglu(device):
    for dtype, shape, grad in [(torch.float32, (3, 20), True), (torch.bfloat16, (2, 3, 9), False), (torch.float16, (33,), True)]:
        gate = torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)
        up = torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)
        torch.library.opcheck(OPS.swiglu.default, (gate, up, False))
        dh = torch.randn(shape, device=device, dtype=dtype)
        torch.library.opcheck(OPS.swiglu_backward.default, (dh, gate.detach(), up.detach()))
        torch.library.opcheck(OPS.swiglu_backward_.default, (dh, gate.detach().clone(), up.detach().clone()))
    # backward_inplace=True writes over gate and up, which opcheck reuses across its checks: only
    # the schema, fake and dispatch checks apply (no gradient requested).
    gate, up = torch.randn(4, 8, device=device), torch.randn(4, 8, device=device)
    torch.library.opcheck(OPS.swiglu.default, (gate, up, True))


# ---- the model wiring -----------------------------------------------------------------------------


def qwen3_model(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def model_of(arch, dtype=torch.float32):
    return qwen3_model(dtype) if arch == "qwen3" else hf_model(arch, dtype=dtype)


EXPECTED_SWITCHED = {  # per layer: the decoder layer, attention, MLP, 2 norms (+ q_norm, k_norm); plus the final norm
    "llama": 2 * 5 + 1, "mistral": 2 * 5 + 1, "qwen2": 2 * 5 + 1, "qwen3": 2 * 7 + 1,
}


def loss_and_lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


MODEL_CASES = [("llama", "cpu"), ("mistral", "cpu"), ("qwen2", "cpu"), ("qwen3", "cpu"),
               pytest.param("llama", "cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")),
               pytest.param("qwen3", "cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU"))]  # fmt: skip


@pytest.mark.parametrize("arch,device", MODEL_CASES)
def test_hf_models_same_loss_and_lora_grads(arch, device):
    model = qlora_ext.prepare(model_of(arch).to(device), r=4, alpha=8, verbose=False, fused_block_ops=False)
    randomize_adapters(model)
    model.train()
    ids = token_batch(2, 12).to(device)
    loss, grads = loss_and_lora_grads(model, ids)
    assert fused_blocks.enable_fused_block_ops(model, devices=(device,)) == EXPECTED_SWITCHED[arch]
    assert fused_blocks.enable_fused_block_ops(model, devices=(device,)) == 0  # idempotent
    with _RecordOps() as record:
        fused_loss, fused_grads = loss_and_lora_grads(model, ids)
    used = {func for func, _ in record.calls}
    assert {OPS.rms_norm.default, OPS.rope.default, OPS.swiglu.default, OPS.rms_norm_backward.default,
            OPS.swiglu_backward_.default} <= used  # fmt: skip
    # fp32 model: only fp32 summation order differs
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == fused_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert fused_blocks.disable_fused_block_ops(model) == EXPECTED_SWITCHED[arch]
    torch.testing.assert_close(loss_and_lora_grads(model, ids)[0], loss, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_hf_llama_bf16_within_bf16_tolerance(device):
    # bf16 model: the fused ops round once where the composite rounds several times, so the two
    # differ by bf16 noise; both are compared with the fp32 model's loss and gradients, and the
    # fused run may be off by at most 2x (loss) / 3x (gradients) the plain bf16 run's error.
    ids = token_batch(2, 16).to(device)
    results = {}
    for name, dtype, fused in [("fp32", torch.float32, False), ("bf16", torch.bfloat16, False), ("fused", torch.bfloat16, True)]:
        model = qlora_ext.prepare(hf_model("llama", dtype=dtype).to(device), r=4, alpha=8, verbose=False,
                                  fused_block_ops=False, compute_dtype=dtype)  # fmt: skip
        randomize_adapters(model)
        model.train()
        if fused:
            assert fused_blocks.enable_fused_block_ops(model, devices=(device,)) == EXPECTED_SWITCHED["llama"]
        results[name] = loss_and_lora_grads(model, ids)
    ref_loss, ref_grads = results["fp32"]
    base_err = (results["bf16"][0].float() - ref_loss).abs().item()
    fused_err = (results["fused"][0].float() - ref_loss).abs().item()
    assert fused_err <= 2 * base_err + torch.finfo(torch.bfloat16).eps * ref_loss.item(), (fused_err, base_err)
    for name, ref in ref_grads.items():
        base = (results["bf16"][1][name].float() - ref).abs().max().item()
        err = (results["fused"][1][name].float() - ref).abs().max().item()
        assert err <= 3 * base + torch.finfo(torch.bfloat16).eps * ref.abs().max().item(), (name, err, base)


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed-rows"])
def test_tiny_llama_same_loss_and_grads(packed):
    from qlora_ext.builtin import TinyLlama, TinyLlamaConfig

    config = TinyLlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=32)  # fmt: skip
    model = qlora_ext.prepare(TinyLlama.from_seed(config, seed=3), r=4, alpha=8, verbose=False, fused_block_ops=False)
    randomize_adapters(model)
    model.train()
    ids = token_batch(2, 10)

    # packed rows: positions restart inside each row, so RoPE gets per-row tables [B, 1, T, Dh]
    extra = {"position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5, 0, 1]])} if packed else {}

    def run():
        model.zero_grad(set_to_none=True)
        loss, _ = model(ids, labels=ids, **extra)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = run()
    # 2 layers x (2 norms + MLP + attention's rotate) + the final norm
    assert fused_blocks.enable_fused_block_ops(model, devices=("cpu",)) == 9
    with _RecordOps() as record:
        fused_loss, fused_grads = run()
    assert OPS.rope.default in {func for func, _ in record.calls}
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_prepare_enables_fused_ops_for_cuda_inputs_only():
    model = qlora_ext.prepare(hf_model("llama"), r=4, verbose=False)
    assert len(fused_blocks.fused_block_modules(model)) == EXPECTED_SWITCHED["llama"]
    ids = token_batch()
    with _RecordOps() as record, torch.no_grad():
        model(ids)
    assert not any(func in (OPS.rms_norm.default, OPS.rope_.default, OPS.swiglu.default) for func, _ in record.calls)
    plain = qlora_ext.prepare(hf_model("llama"), r=4, verbose=False, fused_block_ops=False)
    assert fused_blocks.fused_block_modules(plain) == []


def test_inference_path_rotates_in_place_and_uses_the_cache():
    model = hf_model("llama")
    ids = token_batch(1, 6)
    with torch.no_grad():
        expected = model(ids, use_cache=True).logits
        fused_blocks.enable_fused_block_ops(model, devices=("cpu",))
        with _RecordOps() as record:
            out = model(ids, use_cache=True)
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert OPS.rope_.default in {func for func, _ in record.calls}
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    fused_blocks.disable_fused_block_ops(model)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), generated)


def test_deepcopy_keeps_fused_forwards_bound_to_the_copy():
    model = hf_model("llama")
    fused_blocks.enable_fused_block_ops(model, devices=("cpu",))
    clone = copy.deepcopy(model)
    attn = clone.model.layers[0].self_attn
    assert attn.forward.__self__ is attn
    assert attn._qlora_attention_spec is model.model.layers[0].self_attn._qlora_attention_spec
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_unexpected_structure_is_left_alone_with_a_logged_reason(caplog):
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    # A class from a "transformers.models" module whose forward is not LlamaRMSNorm's (say, a
    # future version's): it must keep its own forward.
    class ShiftedRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 1.0

    ShiftedRMSNorm.__module__ = "transformers.models.llama.modeling_llama"
    model = hf_model("llama")
    model.model.norm = ShiftedRMSNorm(64, eps=1e-6)
    with caplog.at_level(logging.WARNING, logger="qlora_ext"):
        switched = fused_blocks.enable_fused_block_ops(model, devices=("cpu",))
    assert switched == EXPECTED_SWITCHED["llama"] - 1
    assert "ShiftedRMSNorm" in caplog.text and "differs" in caplog.text
    assert "forward" not in vars(model.model.norm)
    other = hf_model("gpt2")
    assert fused_blocks.enable_fused_block_ops(other, devices=("cpu",)) == 0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_block(backend):
    # One TinyLlama decoder layer with every fused op (RMSNorm x2, RoPE, SwiGLU with the in-place
    # backward), compiled whole: the fakes and autograd formulas trace without graph breaks.
    if backend == "inductor":
        import shutil

        if shutil.which("cc") is None and shutil.which("gcc") is None:
            pytest.skip("inductor on CPU needs a C compiler")
    from qlora_ext.builtin import TinyLlama, TinyLlamaConfig

    config = TinyLlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96)  # fmt: skip
    model = TinyLlama.from_seed(config, seed=1)
    assert fused_blocks.enable_fused_block_ops(model, devices=("cpu",)) == 5
    layer = model.model.layers[0]
    cos, sin = model.model.rope_cos[:12], model.model.rope_sin[:12]
    x = torch.randn(2, 12, 64, requires_grad=True)

    def run(fn):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y = fn(x, cos, sin)
        y.square().sum().backward()
        return y.detach(), x.grad, layer.mlp.up_proj.weight.grad, layer.self_attn.q_proj.weight.grad, \
            layer.input_layernorm.weight.grad  # fmt: skip

    eager = run(layer)
    torch._dynamo.reset()
    compiled = run(torch.compile(layer, fullgraph=True, backend=backend))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_past_autograd_skips_only_what_records_nothing(grad):
    # Without grad mode the call bypasses the op's Python autograd (same result, nothing recorded);
    # with it, autograd records as for a plain call.
    from qlora_ext._ops import past_autograd

    gate, up = (torch.randn(5, 24, requires_grad=True) for _ in range(2))
    with torch.set_grad_enabled(grad):
        got = past_autograd(torch.ops.qlora_ext.swiglu, gate, up, False)
        want = torch.ops.qlora_ext.swiglu(gate, up, False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.requires_grad == grad and (got.grad_fn is not None) == grad
    if grad:
        (dg,) = torch.autograd.grad(got.sum(), gate)
        (want_dg,) = torch.autograd.grad(want.sum(), gate)
        torch.testing.assert_close(dg, want_dg, rtol=0, atol=0)
