"""qlora_ext::nf4_linear and qlora_ext::nf4_lora_linear: opcheck, gradcheck, and agreement with
autograd through the plain-PyTorch reference x·deq(W)ᵀ + b + s·(x_lora·Aᵀ)·Bᵀ."""

from __future__ import annotations

import pytest
import torch
from train_helpers import devices

import qlora_ext
from qlora_ext.lora_linear import (GRADIENT_MM_OUT_DTYPE_DEVICES, _EagerNF4Linear, _EagerNF4LoRALinear, _weight_args,
                                  mm_as, nf4_linear, nf4_lora_linear)

# (lead dims of x, K in, N out, r): M = 1, K not a multiple of the block, 3-D input, N odd
SHAPES = [((1,), 64, 32, 4), ((5,), 40, 24, 3), ((2, 3), 96, 33, 8), ((7,), 129, 17, 1)]
SHAPE_IDS = ["M1", "K40", "3d-N33", "K129-r1"]


def make_case(lead, k, n, r, dtype=torch.float32, device="cpu", blocksize=64, double_quant=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    q = qlora_ext.NF4Weight.from_float(w.to(device), blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(*lead, k, generator=g).to(device, dtype)
    a = (torch.randn(r, k, generator=g) * 0.2).to(device, dtype)
    b = (torch.randn(n, r, generator=g) * 0.2).to(device, dtype)
    bias_t = (torch.randn(n, generator=g) * 0.1).to(device, dtype) if bias else None
    return q, x, a, b, bias_t


def reference(x, w_deq, bias, a, b, s, x_lora=None):
    xl = x if x_lora is None else x_lora
    y = x @ w_deq.t() + s * (xl @ a.t()) @ b.t()
    return y if bias is None else y + bias


def lora_args(q, x, a, b, bias, s=0.5, x_lora=None):
    return (x, x_lora, *_weight_args(q), bias, a, b, s)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_opcheck_lora(shape, dtype, device):
    q, x, a, b, bias = make_case(*shape, dtype=dtype, device=device)
    for requires_grad in (False, True):
        tensors = [t.clone().requires_grad_(requires_grad) for t in (x, a, b, bias)]
        torch.library.opcheck(torch.ops.qlora_ext.nf4_lora_linear.default, lora_args(q, *tensors))
    xl = x.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.qlora_ext.nf4_lora_linear.default,
                          lora_args(q, x.requires_grad_(True), a.requires_grad_(True), b, None, x_lora=xl))  # fmt: skip


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_opcheck_linear(shape, dtype, device):
    q, x, _, _, bias = make_case(*shape, dtype=dtype, device=device)
    for requires_grad in (False, True):
        args = (x.clone().requires_grad_(requires_grad), *_weight_args(q), bias.clone().requires_grad_(requires_grad))
        torch.library.opcheck(torch.ops.qlora_ext.nf4_linear.default, args)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("with_x_lora", [False, True], ids=["x", "x_lora"])
def test_eager_twins_equal_the_operators(shape, dtype, device, with_x_lora):
    # Eager code runs the operators' functions through a plain autograd.Function (no custom-op
    # dispatch cost); outputs and every gradient must be bitwise those of the operators.
    q, x, a, b, bias = make_case(*shape, dtype=dtype, device=device)
    dy = torch.randn(*x.shape[:-1], q.shape[0], dtype=dtype, device=device)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b, bias)]
        xl = leaves[0] * 0.5 if with_x_lora else None
        y, _ = fn(*lora_args(q, *leaves, x_lora=xl))
        y.backward(dy)
        y_base = fn_linear[fn](leaves[0], *_weight_args(q), leaves[3])
        (dx_base,) = torch.autograd.grad(y_base, leaves[0], dy)
        return [y, y_base, dx_base] + [t.grad for t in leaves]

    fn_linear = {torch.ops.qlora_ext.nf4_lora_linear: torch.ops.qlora_ext.nf4_linear,
                 _EagerNF4LoRALinear.apply: _EagerNF4Linear.apply}  # fmt: skip
    for got, want in zip(run(_EagerNF4LoRALinear.apply), run(torch.ops.qlora_ext.nf4_lora_linear)):
        assert torch.equal(got, want)


# Small shapes: gradcheck perturbs every input element, each time running the op (and a dequantize).
GRADCHECK_SHAPES = [((1,), 8, 6, 2), ((2, 3), 33, 5, 3)]


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=["M1", "3d-K33"])
def test_gradcheck_fp64(shape, double_quant):
    q, x, a, b, bias = make_case(*shape, dtype=torch.float64, double_quant=double_quant, blocksize=32)
    x, a, b, bias = (t.requires_grad_(True) for t in (x, a, b, bias))
    assert torch.autograd.gradcheck(lambda x, a, b, bias: nf4_lora_linear(x, q, bias, a, b, 0.7), (x, a, b, bias))
    xl = torch.randn_like(x).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, xl, a, b: nf4_lora_linear(x, q, None, a, b, 0.7, x_lora=xl), (x, xl, a, b))
    assert torch.autograd.gradcheck(lambda x, bias: nf4_linear(x, q, bias), (x, bias))


def _forward_backward(fn, inputs, dy):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*inputs)
    y.backward(dy)
    return y.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dropout_input", [False, True], ids=["x", "x_lora"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("s", [0.5, 1.0])  # 1.0 (alpha = r): the backward skips its scaling launches
def test_matches_reference_autograd(shape, dropout_input, dtype, device, s):
    """Forward and every gradient vs autograd through the reference. Low precision: our error vs
    the fp32 reference may be at most 2x (forward) / 3x (backward) that of the reference run in
    the same dtype, plus a small absolute slack (flash-attention's rule, STYLE.md)."""
    q, x, a, b, bias = make_case(*shape, dtype=torch.float32, device=device)
    w32 = q.dequantize(torch.float32)
    dy = torch.randn(*x.shape[:-1], q.shape[0], device=device)
    xl = x * (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.3).to(device) / 0.7 if dropout_input else None
    inputs32 = [x, a, b, bias] + ([xl] if dropout_input else [])

    def ours(x, a, b, bias, xl=None):
        return nf4_lora_linear(x, q, bias, a, b, s, x_lora=xl)

    def ref(w):
        return lambda x, a, b, bias, xl=None: reference(x, w, bias, a, b, s, xl)

    y_true, g_true = _forward_backward(ref(w32), inputs32, dy)
    low = [t.to(dtype) for t in inputs32]
    y_ours, g_ours = _forward_backward(ours, low, dy.to(dtype))
    y_base, g_base = _forward_backward(ref(w32.to(dtype)), low, dy.to(dtype))
    if dtype == torch.float32:
        torch.testing.assert_close(y_ours, y_true, rtol=1e-5, atol=1e-5)
        for go, gt in zip(g_ours, g_true):
            torch.testing.assert_close(go, gt, rtol=1e-5, atol=1e-5)
        return
    def err(u, v):  # the largest absolute difference; 0 for empty tensors (an empty batch)
        return (u.float() - v.float()).abs().max().item() if u.numel() else 0.0

    slack = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert y_ours.shape == y_true.shape
    assert err(y_ours, y_true) <= 2 * err(y_base, y_true) + slack
    for go, gb, gt in zip(g_ours, g_base, g_true):
        assert go.dtype == dtype and go.shape == gt.shape
        assert err(go, gt) <= 3 * err(gb, gt) + slack * max(1.0, err(gt, torch.zeros_like(gt)))


def test_adapter_grads_come_back_in_adapter_dtype():
    """fp32 adapters with bf16 activations (the default setup): grads are fp32, values match."""
    q, x, a, b, bias = make_case((4,), 64, 32, 4)
    a32, b32 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    nf4_lora_linear(x.bfloat16(), q, None, a32, b32, 2.0).float().sum().backward()
    assert a32.grad.dtype == torch.float32 and b32.grad.dtype == torch.float32
    a_r, b_r = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    reference(x, q.dequantize(), None, a_r, b_r, 2.0).sum().backward()
    torch.testing.assert_close(a32.grad, a_r.grad, rtol=0.05, atol=0.05)
    torch.testing.assert_close(b32.grad, b_r.grad, rtol=0.05, atol=0.05)


def _adapter_casts_in_backward(run_forward, adapters) -> list:
    """The casts of the (fp32) adapter tensors to another dtype that the backward of run_forward()
    makes (aten::_to_copy from fp32 at their shapes; not the gradients' casts, which go to fp32)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = {tuple(t.shape) for t in adapters}
    seen = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if (func is torch.ops.aten._to_copy.default and tuple(args[0].shape) in shapes
                    and args[0].dtype == torch.float32 and (kwargs or {}).get("dtype") not in (None, torch.float32)):  # fmt: skip
                seen.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    out = run_forward()
    with Casts():
        out.float().sum().backward()
    return seen


def test_backward_reuses_the_forwards_adapter_casts():
    """The LoRA linear keeps its bf16 casts of fp32 A and B (fused_mlp's projections use the same helper)
    for the backward instead of casting them again; the gradients are those of the reference."""
    q, x, a, b, _ = make_case((4,), 64, 32, 4)
    a32, b32 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    x16 = x.bfloat16().requires_grad_(True)
    assert _adapter_casts_in_backward(lambda: nf4_lora_linear(x16, q, None, a32, b32, 2.0), (a32, b32)) == []
    a_r, b_r = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    x_r = x.bfloat16().requires_grad_(True)
    _EagerNF4LoRALinear.apply(x_r, None, *_weight_args(q), None, a_r, b_r, 2.0)[0].float().sum().backward()
    for got, want in ((a32.grad, a_r.grad), (b32.grad, b_r.grad), (x16.grad, x_r.grad)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [None, 0.37, 1.0])
def test_mm_as_forms_the_gradient_in_the_parameter_dtype(device, dtype, scale):
    """mm_as(a, b, fp32[, s]) on half-precision activations (a transposed view, as the adapters'
    gradients pass it): fp32 out; where GRADIENT_MM_OUT_DTYPE_DEVICES lists the device, the
    product is the fp32-accumulated one, not rounded to `dtype` (so it errs less than the former
    product-then-cast); elsewhere exactly the former rule, mm in `dtype`, scaled there, cast."""
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(333, 19, generator=gen).to(device, dtype).t()  # [19, 333], a view (g.t())
    b = torch.randn(333, 45, generator=gen).to(device, dtype)
    out = mm_as(a, b, torch.float32, scale)
    assert out.dtype == torch.float32 and out.shape == (19, 45)
    s = 1.0 if scale is None else scale
    former = torch.mm(a, b)
    if scale is not None:
        former = former.mul_(scale)
    former = former.float()
    if device not in GRADIENT_MM_OUT_DTYPE_DEVICES:
        assert torch.equal(out, former)
        return
    exact = (a.double() @ b.double()) * s
    err_ours, err_former = (out.double() - exact).abs().max(), (former.double() - exact).abs().max()
    # fp32 accumulation over 333 terms: ~1e-5 relative; the bf16/fp16 rounding of the former ~1e-3
    assert err_ours <= exact.abs().max() * 1e-5
    assert err_ours < err_former


@pytest.mark.parametrize("device", devices)
def test_adapter_grads_fp32_on_every_device(device):
    """fp32 adapters, bf16 activations: the gradients are fp32 and match the fp32 reference's."""
    q, x, a, b, bias = make_case((5, 3), 128, 96, 8, device=device)
    a32, b32 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    nf4_lora_linear(x.bfloat16(), q, None, a32, b32, 1.5).float().pow(2).sum().backward()
    a_r, b_r = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    reference(x.bfloat16().float(), q.dequantize(torch.float32), None, a_r, b_r, 1.5).pow(2).sum().backward()
    for ours, ref in ((a32.grad, a_r.grad), (b32.grad, b_r.grad)):
        assert ours.dtype == torch.float32
        # bf16 activations: ~1% of the gradient's scale
        assert (ours - ref).abs().max() <= 0.02 * ref.abs().max()


def test_backward_keeps_no_dense_weight():
    """Nothing [N, K]-sized is saved for backward: W is dequantized again there."""
    n, k = 96, 80
    q, x, a, b, bias = make_case((3,), k, n, 4)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x.requires_grad_(True)
    a.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nf4_lora_linear(x, q, bias, a, b, 1.0)
    assert saved and all(shape != (n, k) for shape, _ in saved), saved
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_bad_inputs():
    q, x, a, b, bias = make_case((2,), 64, 32, 4)
    with pytest.raises(ValueError, match="lora_A"):
        nf4_lora_linear(x, q, bias, a[:, :10], b, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        nf4_lora_linear(x, q, bias, a, b[:, :2], 1.0)
    with pytest.raises(ValueError, match="features"):
        nf4_linear(x[:, :10], q)
    with pytest.raises(TypeError, match="NF4Weight"):
        nf4_linear(x, q.dequantize())
    with pytest.raises(TypeError, match="float"):
        nf4_linear(x.long(), q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    q, x, a, b, bias = make_case((4, 5), 96, 48, 8)
    y_cpu = nf4_lora_linear(x, q, bias, a, b, 0.5)
    y_cuda = nf4_lora_linear(x.cuda(), q.to("cuda"), bias.cuda(), a.cuda(), b.cuda(), 0.5)
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=1e-4, atol=1e-4)


def test_non_contiguous_inputs():
    q, x, a, b, bias = make_case((4, 6), 48, 20, 4)
    xt = x.transpose(0, 1).requires_grad_(True)  # [6, 4, 48], non-contiguous
    a_t = a.t().contiguous().t().requires_grad_(True)  # [r, K] with transposed strides
    y = nf4_lora_linear(xt, q, bias, a_t, b, 0.5)
    dy = torch.randn(6, 4, 20).transpose(0, 1).contiguous().transpose(0, 1)
    y.backward(dy)
    x_r, a_r = xt.detach().clone().requires_grad_(True), a.clone().requires_grad_(True)
    y_r = reference(x_r, q.dequantize(), bias, a_r, b, 0.5)
    y_r.backward(dy)
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xt.grad, x_r.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a_t.grad, a_r.grad, rtol=1e-5, atol=1e-5)
