"""The LoRA family (DoRA, LoRA-FA, VeRA, Delta-LoRA, rsLoRA, LoRA+): each variant's forward and
gradients against a plain-PyTorch reference of its paper's formula, training a tiny Llama,
save -> load round trips, PEFT interop where PEFT has the method, and clear errors."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import cuda_kernel_names, dequantized_copy, devices, hf_model, logits, randomize_adapters, token_batch

import qlora_ext
from qlora_ext.adapters_io import CONFIG_NAME, WEIGHTS_NAME
from qlora_ext.lora_linear import _weight_args
from qlora_ext.prepare import qlora_layers

METHODS = ["lora", "dora", "lora_fa", "vera", "delta_lora"]


# ---- one layer vs the paper's formula ----------------------------------------------------------


def make_layer(adapter_cls, k=67, n=45, r=4, device="cpu", seed=0, **kw):
    """A QLoRALinear [n, k] with bias (odd sizes: k not a multiple of the NF4 block) and one
    adapter of `adapter_cls` with random (nonzero) parameters."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    layer = qlora_ext.QLoRALinear.from_linear(lin.to(device))
    adapter = adapter_cls(k, n, r, device=device, **kw)
    if isinstance(adapter, qlora_ext.DoRAAdapter):
        adapter.init_magnitude(layer)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(device) * 0.1)
    layer.add_adapter("default", adapter)
    return layer, adapter


def leaf(t):
    return t.detach().clone().requires_grad_(t.requires_grad)


def check_against_reference(layer, params, reference, x, rtol=1e-5, atol=1e-5):
    """Forward and every gradient (x and each trainable adapter parameter) of `layer` vs
    `reference(x, W, bias, *params)` run by autograd on fresh leaves."""
    w = layer.weight.dequantize().float()
    x1, x2 = leaf(x).requires_grad_(True), leaf(x).requires_grad_(True)
    refs = [leaf(p) for p in params]
    y = layer(x1)
    y_ref = reference(x2, w, layer.bias, *refs)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=rtol, atol=atol)
    for p, ref in zip(params, refs):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref.grad, rtol=rtol, atol=atol)
        else:
            assert p.grad is None


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("rslora", [False, True], ids=["s=a/r", "rslora"])
def test_dora_matches_paper(device, rslora):
    layer, ad = make_layer(qlora_ext.DoRAAdapter, alpha=8, rslora=rslora, device=device)
    assert ad.scale == (8 / math.sqrt(4) if rslora else 8 / 4)
    s = ad.scale

    def reference(x, w, bias, a, b, m):  # W' = m ⊙ (W + sBA) / ‖W + sBA‖_row, norm detached
        v = w + s * b @ a
        w_prime = m[:, None] * v / torch.linalg.vector_norm(v, dim=1).detach()[:, None]
        return x @ w_prime.t() + bias

    x = torch.randn(2, 3, 67, device=device)
    check_against_reference(layer, [ad.lora_A.weight, ad.lora_B.weight, ad.lora_magnitude_vector], reference, x)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("r", [4, 16, 17], ids=lambda r: f"r{r}")
def test_dora_norm_from_the_nf4_codes(device, r, monkeypatch):
    """On NORM_FROM_CODES_DEVICES wa = W·Aᵀ comes from nf4_gemv over the NF4 codes (A's r rows as
    its batch, r <= 16; wider A keeps the GEMM over the dequantized W): the layer still matches the
    paper's formula, fp32 to 1e-5, and bf16 matches the GEMM path within bf16 rounding."""
    from qlora_ext import _ops, dora as dora_module

    calls = []
    real = _ops.nf4_gemv
    monkeypatch.setattr(_ops, "nf4_gemv", lambda *args: calls.append(args[0].shape) or real(*args))
    monkeypatch.setattr(dora_module, "NORM_FROM_CODES_DEVICES", (device,))
    layer, ad = make_layer(qlora_ext.DoRAAdapter, r=r, alpha=8, device=device, seed=r)
    s = ad.scale

    def reference(x, w, bias, a, b, m):
        v = w + s * b @ a
        return x @ (m[:, None] * v / torch.linalg.vector_norm(v, dim=1).detach()[:, None]).t() + bias

    x = torch.randn(3, 5, 67, device=device)
    check_against_reference(layer, [ad.lora_A.weight, ad.lora_B.weight, ad.lora_magnitude_vector], reference, x)
    assert calls == ([torch.Size([r, 67])] if r <= 16 else [])

    layer = layer.to(torch.bfloat16)
    xb = x.bfloat16()
    with torch.no_grad():
        y_codes = layer(xb)
        monkeypatch.setattr(dora_module, "NORM_FROM_CODES_DEVICES", ())
        y_gemm = layer(xb)
    assert len(calls) == (2 if r <= 16 else 0)
    torch.testing.assert_close(y_codes.float(), y_gemm.float(), rtol=2e-2, atol=2e-2)


def test_dora_norm_without_dense_update():
    """n from ‖W‖² + 2s⟨W,BA⟩ + s²‖BA‖² equals the dense row norm (the op's 1/n output and the
    adapter's weight_norm); no [out, in] tensor is saved for backward, and the magnitude starts
    at ‖deq(W)‖_row."""
    layer, ad = make_layer(qlora_ext.DoRAAdapter)
    w = layer.weight.dequantize().float()
    dense = ad._dense_row_norm(w)
    args = dora_op_args(layer, ad, torch.randn(3, 67))
    _, _, _, inv_norm, c = torch.ops.qlora_ext.nf4_dora_linear(*args)
    torch.testing.assert_close(inv_norm.reciprocal(), dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, ad.lora_magnitude_vector.detach() / dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ad.weight_norm(layer), dense, rtol=1e-5, atol=1e-6)
    fresh = qlora_ext.DoRAAdapter(67, 45, 4)
    fresh.init_magnitude(layer)
    torch.testing.assert_close(fresh.lora_magnitude_vector.detach(), torch.linalg.vector_norm(w, dim=1))
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (shapes.append(tuple(t.shape)), t)[1], lambda t: t):
        layer(torch.randn(5, 67, requires_grad=True)).sum()
    assert (45, 67) not in shapes and (67, 45) not in shapes, shapes


def dora_op_args(layer, ad, x, x_lora=None, dtype=None, bias=None, grad=False):
    """Arguments of qlora_ext::nf4_dora_linear for `layer`/`ad` (fresh leaves if grad)."""
    def t(p):
        p = p.detach().to(dtype or p.dtype)
        return p.requires_grad_(True) if grad else p
    return (x, x_lora, *_weight_args(layer.weight), bias, t(ad.lora_A.weight), t(ad.lora_B.weight), float(ad.scale),
            t(ad.lora_magnitude_vector), ad.weight_sq_norm(layer))  # fmt: skip


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_x_lora", [False, True], ids=["x", "x_lora"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_opcheck_dora_op(dtype, with_x_lora, with_bias, device):
    layer, ad = make_layer(qlora_ext.DoRAAdapter, device=device)
    x = torch.randn(2, 3, 67, dtype=dtype, device=device, requires_grad=True)
    xl = torch.randn(2, 3, 67, dtype=dtype, device=device, requires_grad=True) if with_x_lora else None
    bias = layer.bias.detach().clone().requires_grad_(True) if with_bias else None
    args = dora_op_args(layer, ad, x, xl, dtype=dtype, bias=bias, grad=True)
    torch.library.opcheck(torch.ops.qlora_ext.nf4_dora_linear.default, args)


# odd sizes: K not a multiple of the NF4 block, N odd, a single row, a 3-D batch
DORA_SHAPES = [(67, 45, 4, (2, 3)), (130, 7, 3, (1,)), (64, 33, 1, (5,))]


def dora_reference(x, xl, w, bias, a, b, m, s):
    """The paper's formula with autograd: W' = m ⊙ (W + sBA)/‖W + sBA‖_row (norm detached); the
    low-rank path sees xl (dropout), the base path x."""
    v = w + s * b @ a
    n = torch.linalg.vector_norm(v, dim=1).detach()
    z = x @ w.t() + s * (xl @ a.t()) @ b.t()
    y = z * (m / n)
    return y if bias is None else y + bias


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("shape", DORA_SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
@pytest.mark.parametrize("with_x_lora", [False, True], ids=["x", "x_lora"])
def test_dora_op_gradients_match_reference(shape, with_x_lora, device):
    """Forward and the gradients of x, x_lora, A, B, m and bias (all trainable here) vs autograd
    through the reference formula."""
    k, n, r, lead = shape
    layer, ad = make_layer(qlora_ext.DoRAAdapter, k=k, n=n, r=r, device=device)
    w = layer.weight.dequantize().float()
    x = torch.randn(*lead, k, device=device)
    xl = torch.randn(*lead, k, device=device) if with_x_lora else None
    bias = layer.bias.detach()
    ins = [leaf(t).requires_grad_(True) for t in (x, bias, ad.lora_A.weight, ad.lora_B.weight, ad.lora_magnitude_vector)]
    refs = [leaf(t).requires_grad_(True) for t in ins]
    xl1, xl2 = (None, None) if xl is None else (leaf(xl).requires_grad_(True), leaf(xl).requires_grad_(True))
    y = qlora_ext.nf4_dora_linear(ins[0], layer.weight, ins[1], ins[2], ins[3], ins[4], ad.weight_sq_norm(layer),
                                  ad.scale, xl1)  # fmt: skip
    x2, b2, a2, bb2, m2 = refs
    y_ref = dora_reference(x2, x2 if xl2 is None else xl2, w, b2, a2, bb2, m2, ad.scale)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want in zip([*ins, xl1], [*refs, xl2]):
        if got is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_x_lora", [False, True], ids=["x", "x_lora"])
def test_dora_eager_twin_matches_operator_bitwise(dtype, with_x_lora, device):
    """Outside torch.compile the layer runs the operator's functions through a plain
    autograd.Function: outputs and every gradient must be the operator's, bit for bit."""
    from qlora_ext.dora import _EagerNF4DoRALinear

    layer, ad = make_layer(qlora_ext.DoRAAdapter, device=device)
    x = torch.randn(2, 3, 67, dtype=dtype, device=device)
    xl = torch.randn(2, 3, 67, dtype=dtype, device=device) if with_x_lora else None
    dy = torch.randn(2, 3, 45, dtype=dtype, device=device)
    results = []
    for fn in (torch.ops.qlora_ext.nf4_dora_linear, _EagerNF4DoRALinear.apply):
        x1 = leaf(x).requires_grad_(True)
        xl1 = None if xl is None else leaf(xl).requires_grad_(True)
        bias = layer.bias.detach().clone().requires_grad_(True)
        args = dora_op_args(layer, ad, x1, xl1, bias=bias, grad=True)
        out = fn(*args)
        out[0].backward(dy)
        grads = [t.grad for t in (x1, xl1, bias, args[12], args[13], args[15]) if t is not None]
        results.append((*out, *grads))
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_dora_dropout_path():
    """Training with dropout: the low-rank path sees dropout(x), the base path x; forward and
    gradients vs the reference with the same mask; eval ignores dropout."""
    layer, ad = make_layer(qlora_ext.DoRAAdapter, dropout=0.5)
    layer.train()
    w, s = layer.weight.dequantize().float(), ad.scale
    x = torch.randn(4, 67)
    params = [ad.lora_A.weight, ad.lora_B.weight, ad.lora_magnitude_vector]
    refs = [leaf(p) for p in params]
    x1, x2 = leaf(x).requires_grad_(True), leaf(x).requires_grad_(True)
    torch.manual_seed(5)
    y = layer(x1)
    torch.manual_seed(5)
    xl = torch.nn.functional.dropout(x2, 0.5, training=True)
    y_ref = dora_reference(x2, xl, w, layer.bias, *refs, s)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want in zip([x1, *params], [x2, *refs]):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dora_reference(x, x, w, layer.bias, *params, s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices)
def test_dora_bf16_error_within_plain_pytorch_bf16(device):
    """bf16 forward vs the fp32 reference: at most 2x the error of the same formula in plain bf16."""
    layer, ad = make_layer(qlora_ext.DoRAAdapter, k=256, n=96, r=8, device=device)
    x = torch.randn(16, 256, device=device)
    w, s = layer.weight.dequantize().float(), ad.scale
    a, b, m = ad.lora_A.weight.detach(), ad.lora_B.weight.detach(), ad.lora_magnitude_vector.detach()

    def formula(x, w, a, b, m, bias):
        v = w + s * b @ a
        return (x @ v.t()) * (m / torch.linalg.vector_norm(v.float(), dim=1).to(v.dtype)) + bias

    exact = formula(x, w, a, b, m, layer.bias)
    plain = formula(*(t.bfloat16() for t in (x, w, a, b, m, layer.bias))).float()
    with torch.no_grad():
        ours = layer(x.bfloat16()).float()
    assert (ours - exact).abs().max() <= 2 * (plain - exact).abs().max() + 1e-6


@pytest.mark.parametrize("device", devices)
def test_lora_fa_matches_paper_and_keeps_no_input(device):
    layer, ad = make_layer(qlora_ext.LoRAFAAdapter, alpha=8, device=device)
    assert not ad.lora_A.weight.requires_grad and ad.lora_B.weight.requires_grad
    s = ad.scale

    def reference(x, w, bias, a, b):
        return x @ w.t() + bias + s * (x @ a.t()) @ b.t()

    x = torch.randn(2, 3, 67, device=device)
    check_against_reference(layer, [ad.lora_A.weight, ad.lora_B.weight], reference, x)
    # backward needs x·Aᵀ [M, r] only: nothing shaped like x is saved by the layer
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        layer(torch.randn(2, 3, 67, device=device, requires_grad=True))
    assert saved and all(t.shape[-1] != 67 or t.dim() == 2 and t.shape[0] == 4 for t in saved), \
        [tuple(t.shape) for t in saved]  # only A [r, in] may have `in` columns  # fmt: skip


@pytest.mark.parametrize("device", devices)
def test_vera_matches_paper(device):
    layer, ad = make_layer(qlora_ext.VeRAAdapter, r=6, prng_key=7, projection_shape=(50, 70), device=device)
    a_full, b_full = qlora_ext.vera.vera_projections(7, 6, 70, 50, torch.device(device), torch.float32)
    a, b = a_full[:, :67], b_full[:45, :]

    def reference(x, w, bias, lam_b, lam_d):  # ΔW = diag(b)·B·diag(d)·A
        return x @ (w + torch.diag(lam_b) @ b @ torch.diag(lam_d) @ a).t() + bias

    x = torch.randn(2, 3, 67, device=device)
    check_against_reference(layer, [ad.vera_lambda_b, ad.vera_lambda_d], reference, x)
    # fresh vectors: d = d_initial, b = 0 (a no-op), projections kaiming-uniform with fan_in = in_max / r
    fresh = qlora_ext.VeRAAdapter(67, 45, 6, d_initial=0.3)
    assert torch.equal(fresh.vera_lambda_d, torch.full((6,), 0.3)) and not fresh.vera_lambda_b.any()
    assert a_full.abs().max() <= math.sqrt(6 / 70) and b_full.abs().max() <= math.sqrt(6 / 6)
    assert a_full.abs().max() > 0.9 * math.sqrt(6 / 70)


def test_vera_trains_after_its_projections_were_first_made_in_inference_mode():
    """The shared projections are cached; generate (inference_mode) may be the first to ask for
    them. Training afterwards must still work (an inference tensor cannot be saved for backward)."""
    qlora_ext.vera.vera_projections.cache_clear()
    layer, ad = make_layer(qlora_ext.VeRAAdapter, r=5, prng_key=11, device="cpu")
    x = torch.randn(2, 3, 67)
    with torch.inference_mode():
        want = layer(x).clone()
    a, b = ad.projections("cpu", torch.float32)
    assert not a.is_inference() and not b.is_inference()
    layer(x).sum().backward()
    assert ad.vera_lambda_d.grad is not None and ad.vera_lambda_b.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)


def delta_lora_reference_run(w0, a0, b0, s, lam, start_step, batches, lr):
    """The paper's algorithm, literally: dense W updated after each optimizer step from
    `start_step` on by λ·(B_{t+1}A_{t+1} − B_tA_t); A, B trained by SGD through the LoRA path only."""
    w, a, b = w0.clone(), a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    outputs = []
    for step, (x, target) in enumerate(batches):
        y = x @ (w + s * b @ a).t()
        outputs.append(y.detach())
        ((y - target) ** 2).mean().backward()
        prev = (b @ a).detach()
        with torch.no_grad():
            a -= lr * a.grad
            b -= lr * b.grad
            a.grad = b.grad = None
            if step + 1 > start_step:
                w += lam * (b @ a - prev)
    return outputs, a.detach(), b.detach()


@pytest.mark.parametrize("start_step", [0, 2])
def test_delta_lora_matches_paper_algorithm(start_step):
    layer = qlora_ext.QLoRALinear.from_linear(torch.nn.Linear(33, 21, bias=False))
    torch.manual_seed(3)
    ad = qlora_ext.DeltaLoRAAdapter(33, 21, r=3, alpha=6, delta_lambda=0.5)
    layer.add_adapter("default", ad)
    model = torch.nn.Sequential(layer)
    updater = qlora_ext.DeltaLoRAUpdater(model, start_step=start_step)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 33, generator=g), torch.randn(8, 21, generator=g)) for _ in range(6)]
    ref_out, ref_a, ref_b = delta_lora_reference_run(layer.weight.dequantize().float(), ad.lora_A.weight.detach(),
                                                     ad.lora_B.weight.detach(), ad.scale, 0.5, start_step, batches, 0.5)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for (x, target), y_ref in zip(batches, ref_out):
        y = model(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        ((y - target) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        updater.step()
    torch.testing.assert_close(ad.lora_A.weight.detach(), ref_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ad.lora_B.weight.detach(), ref_b, rtol=1e-5, atol=1e-6)
    assert updater.started and ad._snapshot_is_zero == (start_step == 0)


def test_delta_lora_gradients_through_lora_path_only():
    layer, ad = make_layer(qlora_ext.DeltaLoRAAdapter, alpha=8, delta_lambda=1.5)
    with torch.no_grad():  # a nonzero snapshot (A_K, B_K), as after a warm-up of K steps
        ad.start()
        ad.lora_A.weight.add_(0.1)
        ad.lora_B.weight.mul_(1.5)
    s, a0, b0 = ad.scale, ad.delta_lora_A0.clone(), ad.delta_lora_B0.clone()

    def reference(x, w, bias, a, b):  # W_t = W_0 + λ(BA − B_K A_K) is a constant for A's, B's gradients
        w_t = w + 1.5 * (b @ a - b0 @ a0).detach()
        return x @ (w_t + s * b @ a).t() + bias

    check_against_reference(layer, [ad.lora_A.weight, ad.lora_B.weight], reference, torch.randn(4, 67))


def test_rslora_scale_and_prepare():
    model = hf_model()
    qlora_ext.prepare(model, r=16, alpha=8, rslora=True, method="dora", verbose=False)
    assert all(layer.adapters["default"].scale == 2.0 for layer in qlora_layers(model).values())


# ---- a tiny Llama trains with each method ---------------------------------------------------------


def train(model, steps=12, lr=1e-2, groups=None, updater=None):
    ids = token_batch(batch=4, seq=16).to(next(model.parameters()).device)
    opt = torch.optim.AdamW(groups or [p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if updater is not None:
            updater.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", METHODS)
def test_tiny_llama_trains(method):
    model = hf_model()
    # VeRA trains only ~r + out numbers per layer: its paper uses a high rank and a larger lr, and it
    # still falls more slowly in 12 steps
    r, lr, target = (128, 1e-1, 0.9) if method == "vera" else (8, 1e-2, 0.8)
    qlora_ext.prepare(model, r=r, alpha=16, method=method, verbose=False, gradient_checkpointing=False)
    updater = qlora_ext.DeltaLoRAUpdater(model) if method == "delta_lora" else None
    losses = train(model, lr=lr, updater=updater)
    assert losses[-1] < target * losses[0], losses


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("method", METHODS)
def test_an_empty_batch_gives_empty_outputs_and_zero_gradients(device, method):
    """No rows (an empty shard, a filtered-out batch): every variant's layer returns [0, ..., N]
    and backpropagates zeros (it used to fail reshaping x·Aᵀ of 0 elements to [0, -1]), as do
    the model's fused Q/K/V and MLP units."""
    from qlora_ext.methods import METHODS as ADAPTERS

    layer, adapter = make_layer(ADAPTERS[method], device=device)
    x = torch.randn(0, 3, 67, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 45)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in adapter.parameters():
        assert p.grad is None or not p.grad.any()
    model = hf_model().to(device)
    qlora_ext.prepare(model, r=4, method=method, verbose=False, gradient_checkpointing=False)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    h = torch.randn(0, 4, model.config.hidden_size, device=device, requires_grad=True)
    from qlora_ext import fused_qkv

    qkv = fused_qkv.lora_qkv(h, attn.q_proj, attn.k_proj, attn.v_proj)  # None: the modules take it
    assert (qkv is not None) == (method in ("lora", "dora"))
    outs = (*(qkv or (p(h) for p in (attn.q_proj, attn.k_proj, attn.v_proj))), mlp(h))
    assert [tuple(o.shape[:2]) for o in outs] == [(0, 4)] * 4
    sum(o.sum() for o in outs).backward()
    assert h.grad.shape == h.shape and not h.grad.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_tiny_llama_trains_bf16_cuda(method):
    model = hf_model(dtype=torch.bfloat16).cuda()
    r, lr, target = (128, 1e-1, 0.9) if method == "vera" else (8, 1e-2, 0.85)  # bf16: a little slack
    qlora_ext.prepare(model, r=r, alpha=16, method=method, verbose=False)
    updater = qlora_ext.DeltaLoRAUpdater(model) if method == "delta_lora" else None
    losses = train(model, lr=lr, updater=updater)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < target * losses[0], losses


def test_tiny_llama_trains_with_loraplus_and_checkpointing():
    model = hf_model()
    qlora_ext.prepare(model, r=8, alpha=16, method="dora", verbose=False)
    losses = train(model, lr=2e-3, groups=qlora_ext.loraplus_param_groups(model, lr=2e-3, ratio=16))
    assert losses[-1] < 0.8 * losses[0], losses


# ---- LoRA+ groups -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "lora_fa", "vera"])
def test_loraplus_groups(method):
    model = hf_model()
    qlora_ext.prepare(model, r=4, method=method, verbose=False)
    groups = qlora_ext.loraplus_param_groups(model, lr=1e-3, ratio=8, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    fast = {names[id(p)] for g in groups if g["lr"] == 8e-3 for p in g["params"]}
    slow = {names[id(p)] for g in groups if g["lr"] == 1e-3 for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert fast | slow == trainable and not fast & slow and all(g["weight_decay"] == 0.1 for g in groups)
    assert all(".lora_B." in n or "magnitude" in n or "vera_lambda" in n for n in fast)
    assert all(".lora_A." in n for n in slow)
    if method == "lora_fa":
        assert not slow  # A is frozen
    torch.optim.Adam(groups).step()  # usable by any torch optimizer


# ---- save -> load --------------------------------------------------------------------------------


def prepared(method, seed=0, adapter_seed=1, **kw):
    model = hf_model(seed=seed)
    torch.manual_seed(99)
    qlora_ext.prepare(model, r=4, alpha=8, method=method, verbose=False, **kw)
    randomize_adapters(model, seed=adapter_seed)
    if method == "delta_lora":  # a nonzero snapshot, then B moves on: all of Delta-LoRA's state
        for layer in qlora_layers(model).values():
            layer.adapters["default"].start()
        randomize_adapters(model, seed=adapter_seed + 1)
    return model.eval()


@pytest.mark.parametrize("method", METHODS)
def test_round_trip(tmp_path, method):
    ids = token_batch()
    model = prepared(method)
    qlora_ext.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == ("VERA" if method == "vera" else "LORA")
    assert config.get("use_dora", False) == (method == "dora")
    assert config.get("qlora_ext_method", "lora") == (method if method in ("lora_fa", "delta_lora") else "lora")
    expected = logits(model, ids)
    # into the same method's existing adapter (overwritten in place) ...
    target = prepared(method, adapter_seed=5)
    qlora_ext.load_adapter(target, tmp_path)
    torch.testing.assert_close(logits(target, ids), expected, rtol=0, atol=0)
    # ... and as a fresh adapter on a model prepared with plain LoRA: the file picks the class
    other = prepared("lora", adapter_seed=5)
    qlora_ext.load_adapter(other, tmp_path, adapter_name="loaded")
    torch.testing.assert_close(logits(other, ids), expected, rtol=0, atol=0)
    kinds = {type(layer.adapters["loaded"]) for layer in qlora_layers(other).values()}
    assert kinds == {qlora_ext.METHODS[method]}
    assert trainable_names(other, "loaded") == trainable_names(target, "default")  # LoRA-FA: A stays frozen


def trainable_names(model, adapter_name):
    tag = f".{adapter_name}."
    return {n.replace(tag, ".*.") for n, p in model.named_parameters() if p.requires_grad and tag in n}


@pytest.mark.parametrize("method", METHODS)
def test_merged_export_equals_adapter(method):
    ids = token_batch()
    model = prepared(method)
    dense = dequantized_copy(model, hf_model(seed=3), adapter_name="default")
    torch.testing.assert_close(logits(dense, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_dora_merge_unmerge_inverse():
    layer, ad = make_layer(qlora_ext.DoRAAdapter)
    w = layer.weight.dequantize().float()
    torch.testing.assert_close(ad.unmerged_weight(ad.merged_weight(w)), w, rtol=1e-5, atol=1e-6)


def test_vera_file_stores_only_vectors(tmp_path):
    model = prepared("vera", vera_prng_key=11)
    qlora_ext.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert keys and all(k.endswith((".vera_lambda_b", ".vera_lambda_d")) for k in keys)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["projection_prng_key"] == 11 and config["save_projection"] is False and config["r"] == 4


# ---- PEFT interop ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method,kw", [("dora", {}), ("dora", {"rslora": True}), ("vera", {"vera_prng_key": 3}),
                                       ("lora_fa", {})], ids=["dora", "dora-rslora", "vera", "lora_fa"])  # fmt: skip
def test_peft_loads_our_adapter(tmp_path, method, kw):
    peft = pytest.importorskip("peft")
    ids = token_batch()
    model = prepared(method, **kw)
    qlora_ext.save_adapter(model, tmp_path)
    base = dequantized_copy(model, hf_model(seed=3))
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_we_load_peft_dora(tmp_path):
    peft = pytest.importorskip("peft")
    ids = token_batch()
    model = prepared("lora")
    base = dequantized_copy(model, hf_model(seed=3))
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                             use_dora=True, task_type="CAUSAL_LM")  # fmt: skip
    peft_model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():  # magnitudes away from ‖W‖ so that a wrong norm would show
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.1 * torch.rand(p.shape))
    peft_model.save_pretrained(str(tmp_path))
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    qlora_ext.load_adapter(model, tmp_path, adapter_name="peft_dora")
    assert all(isinstance(m.adapters["peft_dora"], qlora_ext.DoRAAdapter) for m in qlora_layers(model).values())
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), rtol=1e-5, atol=1e-5)


def test_we_load_peft_vera(tmp_path):
    peft = pytest.importorskip("peft")
    ids = token_batch()
    model = prepared("lora")
    base = dequantized_copy(model, hf_model(seed=3))
    config = peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                             projection_prng_key=5, save_projection=False, task_type="CAUSAL_LM")  # fmt: skip
    peft_model = peft.get_peft_model(base, config).eval()
    randomize_adapters(peft_model, seed=4)
    peft_model.save_pretrained(str(tmp_path))
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_d" in keys
    qlora_ext.load_adapter(model, tmp_path, adapter_name="peft_vera")
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), rtol=1e-5, atol=1e-5)


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"method": "qlora"}, "unknown method 'qlora'"),
        ({"method": "lora", "vera_prng_key": 1}, "vera_prng_key applies only to method='vera'"),
        ({"method": "dora", "delta_lambda": 1.0}, "delta_lambda applies only to method='delta_lora'"),
        ({"method": "delta_lora", "delta_lambda": -1.0}, "delta_lambda .* >= 0"),
        ({"method": "delta_lora", "dropout": 0.1}, "removes dropout"),
        ({"method": "vera", "rslora": True}, "VeRA has no alpha/r scale"),
        ({"method": "vera", "vera_d_initial": float("nan")}, "vera_d_initial must be a finite number"),
        ({"method": "vera", "vera_prng_key": "seed"}, "vera_prng_key must be an int"),
    ],
    ids=["unknown", "vera-arg-on-lora", "delta-arg-on-dora", "negative-lambda", "delta-dropout",
         "vera-rslora", "vera-nan-d", "vera-str-key"],
)  # fmt: skip
def test_prepare_bad_method_args(kw, match):
    model = hf_model()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        qlora_ext.prepare(model, r=4, verbose=False, **kw)
    assert not qlora_layers(model) and all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_other_bad_input(tmp_path):
    model = prepared("lora")
    with pytest.raises(ValueError, match="ratio must be a positive number"):
        qlora_ext.loraplus_param_groups(model, lr=1e-3, ratio=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        qlora_ext.loraplus_param_groups(model, lr=-1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        qlora_ext.loraplus_param_groups(hf_model().requires_grad_(False), lr=1e-3)
    with pytest.raises(ValueError, match="no Delta-LoRA adapters"):
        qlora_ext.DeltaLoRAUpdater(model)
    with pytest.raises(ValueError, match="start_step"):
        qlora_ext.DeltaLoRAUpdater(prepared("delta_lora"), start_step=-1)
    # a DoRA file cannot overwrite an existing plain-LoRA adapter of the same name
    qlora_ext.save_adapter(prepared("dora"), tmp_path / "dora")
    with pytest.raises(ValueError, match="describes a DoRAAdapter.*LoRAAdapter"):
        qlora_ext.load_adapter(model, tmp_path / "dora")
    # VeRA files with stored projections, DoRA combined with LoRA-FA: refused with the reason
    qlora_ext.save_adapter(prepared("vera"), tmp_path / "vera")
    config = json.loads((tmp_path / "vera" / CONFIG_NAME).read_text())
    (tmp_path / "vera" / CONFIG_NAME).write_text(json.dumps({**config, "save_projection": True}))
    with pytest.raises(ValueError, match="save_projection=true"):
        qlora_ext.load_adapter(model, tmp_path / "vera", adapter_name="v")
    config = json.loads((tmp_path / "dora" / CONFIG_NAME).read_text())
    (tmp_path / "dora" / CONFIG_NAME).write_text(json.dumps({**config, "qlora_ext_method": "lora_fa"}))
    with pytest.raises(ValueError, match="use_dora=true cannot be combined"):
        qlora_ext.load_adapter(model, tmp_path / "dora", adapter_name="d")
    with pytest.raises(NotImplementedError, match="forward_with_base"):
        qlora_ext.DoRAAdapter(8, 4, 2).delta(torch.randn(1, 8))


def test_torch_compile_dora_layer():
    layer, _ = make_layer(qlora_ext.DoRAAdapter)
    x = torch.randn(3, 67)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)


# ---- DoRA's native operators (qlora_ext::dora_scale, dora_scale_backward, dora_column_scale) -----

# dora_scale's A·Aᵀ on CUDA: at::mm or qlora's kernel (dora.GRAM_KERNEL_DEVICES); the CPU has at::mm.
GRAM_KERNEL = pytest.mark.parametrize("gram", ["mm", "kernel"], ids=["gram-mm", "gram-kernel"])


@contextlib.contextmanager
def _gram_selected(gram: str, device: str):
    """dora.GRAM_KERNEL_DEVICES set for `gram` within the block (a CPU test of "kernel" skips)."""
    if gram == "kernel" and device != "cuda":
        pytest.skip("the A·Aᵀ kernel is CUDA's")
    saved = qlora_ext.dora.GRAM_KERNEL_DEVICES
    qlora_ext.dora.GRAM_KERNEL_DEVICES = ("cuda",) if gram == "kernel" else ()
    try:
        yield
    finally:
        qlora_ext.dora.GRAM_KERNEL_DEVICES = saved

from qlora_ext.dora import (  # noqa: E402
    dora_column_scale,
    dora_column_scale_reference,
    dora_scale,
    dora_scale_backward,
    dora_scale_backward_reference,
    dora_scale_reference,
    nf4_dora_linear,
)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,r", [(45, 4), (1, 1), (300, 16), (96, 80)], ids=["odd", "1x1", "r16", "r80"])
@GRAM_KERNEL
def test_dora_scale_matches_reference(n, r, dtype, device, gram):
    """The native scale vs its reference, and n vs the dense norm ‖W + s·B·A‖_row."""
    with _gram_selected(gram, device):
        _check_dora_scale(n, r, dtype, device)


def _check_dora_scale(n, r, dtype, device):
    g = torch.Generator().manual_seed(n + r)
    k = 70
    w = torch.randn(n, k, generator=g).to(device)
    a, b = (torch.randn(r, k, generator=g) * 0.3).to(device), (torch.randn(n, r, generator=g) * 0.3).to(device)
    m = torch.rand(n, generator=g).to(device) + 0.5
    wa, sq, s = (w @ a.t()).to(dtype), w.square().sum(1), 1.5
    args = (wa, a, b, sq, m, s)
    col_scale, inv_norm = dora_scale(*args)
    ref_scale, ref_inv = dora_scale_reference(*args)
    assert col_scale.dtype == dtype and inv_norm.dtype == torch.float32
    torch.testing.assert_close(inv_norm, ref_inv, rtol=1e-5, atol=0)
    torch.testing.assert_close(col_scale, ref_scale, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)
    if dtype == torch.float32:
        dense = torch.linalg.vector_norm(w + s * b @ a, dim=1)
        torch.testing.assert_close(inv_norm.reciprocal(), dense, rtol=1e-5, atol=0)
    torch.library.opcheck(torch.ops.qlora_ext.dora_scale.default, args)
    # adapters in bf16 are read as they are (no fp32 copy needed by the caller)
    low = dora_scale(wa, a.bfloat16(), b.bfloat16(), sq, m.bfloat16(), s)[1]
    torch.testing.assert_close(low, dora_scale_reference(wa, a.bfloat16(), b.bfloat16(), sq, m.bfloat16(), s)[1])


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,r", [([45, 7, 7], 4), ([1], 1), ([0, 5, 3], 16), ([300, 64, 64, 17], 16),
                                    ([33, 40], 33)], ids=["qkv-odd", "one", "empty-layer", "four", "r33"])  # fmt: skip
@GRAM_KERNEL
def test_dora_scale_stacked_matches_one_layer_at_a_time(rows, r, dtype, device, gram):
    """S layers' scales from one call on stacked rows equal dora_scale of each layer (and the
    reference, and the dense norm): each row reads its own layer's column block of wa, diagonal
    block of A·Aᵀ and scale. r = 33 takes the kernel without registers on CUDA."""
    with _gram_selected(gram, device):
        _check_dora_scale_stacked(rows, r, dtype, device)


def _check_dora_scale_stacked(rows, r, dtype, device):
    g = torch.Generator().manual_seed(sum(rows) + r)
    k, layers = 70, len(rows)
    ws = [torch.randn(n, k, generator=g).to(device) for n in rows]
    a_s = [(torch.randn(r, k, generator=g) * 0.3).to(device) for _ in rows]
    b_s = [(torch.randn(n, r, generator=g) * 0.3).to(device) for n in rows]
    m_s = [torch.rand(n, generator=g).to(device) + 0.5 for n in rows]
    scales = [0.5 + j for j in range(layers)]
    w, a, b, m = torch.cat(ws), torch.cat(a_s), torch.cat(b_s), torch.cat(m_s)
    wa, sq = (w @ a.t()).to(dtype), w.square().sum(1)  # [N, S·r]: every layer's W against every A
    args = (wa, a, b, sq, m, rows, scales)
    col_scale, inv_norm = qlora_ext.dora.dora_scale_stacked(*args)
    assert col_scale.shape == inv_norm.shape == (sum(rows),)
    assert col_scale.dtype == dtype and inv_norm.dtype == torch.float32
    one_by_one = [dora_scale(wa_j[:, j * r : (j + 1) * r].contiguous(), a_j, b_j, sq_j, m_j, s)
                  for j, (wa_j, a_j, b_j, sq_j, m_j, s) in enumerate(zip(wa.split(rows), a_s, b_s, sq.split(rows), m_s,
                                                                         scales))]  # fmt: skip
    torch.testing.assert_close(inv_norm, torch.cat([p[1] for p in one_by_one]), rtol=1e-5, atol=0)
    col_tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(col_scale, torch.cat([p[0] for p in one_by_one]), rtol=col_tol, atol=0)
    ref_scale, ref_inv = qlora_ext.dora.dora_scale_stacked_reference(*args)
    torch.testing.assert_close(inv_norm, ref_inv, rtol=1e-5, atol=0)
    torch.testing.assert_close(col_scale, ref_scale, rtol=col_tol, atol=0)
    if dtype == torch.float32:
        dense = torch.cat([torch.linalg.vector_norm(w_j + s * b_j @ a_j, dim=1)
                           for w_j, a_j, b_j, s in zip(ws, a_s, b_s, scales)])  # fmt: skip
        torch.testing.assert_close(inv_norm.reciprocal(), dense, rtol=1e-5, atol=0)
    torch.library.opcheck(torch.ops.qlora_ext.dora_scale_stacked.default, args)


def test_dora_scale_stacked_bad_input():
    wa, a, b = torch.randn(6, 4), torch.randn(4, 5), torch.randn(6, 2)
    sq, m = torch.ones(6), torch.ones(6)
    op = torch.ops.qlora_ext.dora_scale_stacked
    with pytest.raises(RuntimeError, match="rows must sum to wa's N = 6"):
        op(wa, a, b, sq, m, [3, 2], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="scales must have one entry per layer of rows"):
        op(wa, a, b, sq, m, [3, 3], [1.0])
    with pytest.raises(RuntimeError, match="rows must list 1 to 4 layers"):
        op(torch.randn(6, 10), torch.randn(10, 5), b, sq, m, [1, 1, 1, 1, 2], [1.0] * 5)
    with pytest.raises(RuntimeError, match="rows must list 1 to 4 layers"):  # not one layer of scale 0
        op(wa, a, b, sq, m, [], [])
    with pytest.raises(RuntimeError, match="rows must be >= 0"):
        op(wa, a, b, sq, m, [7, -1], [1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"wa must be \[N, S·r\]"):
        op(torch.randn(6, 5), torch.randn(5, 5), b, sq, m, [3, 3], [1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"lora_A must be \[S·r, K\] with S·r = 4"):
        op(wa, torch.randn(2, 5), b, sq, m, [3, 3], [1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"lora_B must be \[N, r\] = \[6, 2\], got \[6, 4\]"):
        op(wa, a, torch.randn(6, 4), sq, m, [3, 3], [1.0, 1.0])


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead,n", [((1,), 8), ((3, 5), 45), ((300,), 64), ((1030,), 24), ((4,), 1), ((0,), 5)],
                         ids=["M1", "3d-odd", "M300", "chunks", "N1", "M0"])  # fmt: skip
def test_dora_scale_backward_matches_reference(lead, n, dtype, device):
    g = torch.Generator().manual_seed(n)
    dy, z = (torch.randn(*lead, n, generator=g).to(device, dtype) for _ in range(2))
    col_scale = (torch.rand(n, generator=g) + 0.5).to(device, dtype)
    inv_norm = (torch.rand(n, generator=g) + 0.5).to(device)
    dz, dm = dora_scale_backward(dy, z, col_scale, inv_norm)
    ref_dz, ref_dm = dora_scale_backward_reference(dy, z, col_scale, inv_norm)
    assert dz.shape == dy.shape and dz.dtype == dtype and dm.dtype == torch.float32
    torch.testing.assert_close(dz, ref_dz, rtol=0, atol=0)  # one product, rounded once either way
    torch.testing.assert_close(dm, ref_dm, rtol=1e-5, atol=1e-5 * max(1, math.prod(lead)) ** 0.5)
    torch.library.opcheck(torch.ops.qlora_ext.dora_scale_backward.default, (dy, z, col_scale, inv_norm))
    # a non-contiguous dy (as autograd may hand over) gives the same result
    dy_t = dy.transpose(0, -1).contiguous().transpose(0, -1) if dy.dim() > 1 else dy
    torch.testing.assert_close(dora_scale_backward(dy_t, z, col_scale, inv_norm)[1], dm)


def test_dora_ops_bad_input():
    wa, a, b = torch.randn(6, 2), torch.randn(2, 5), torch.randn(6, 2)
    sq, m = torch.ones(6), torch.ones(6)
    with pytest.raises(RuntimeError, match=r"lora_B must be \[N, r\] = \[6, 2\], got \[6, 3\]"):
        torch.ops.qlora_ext.dora_scale(wa, a, torch.randn(6, 3), sq, m, 1.0)
    with pytest.raises(RuntimeError, match="weight_sq must be float32"):
        torch.ops.qlora_ext.dora_scale(wa, a, b, sq.double(), m, 1.0)
    with pytest.raises(RuntimeError, match=r"magnitude must be \[N\] = \[6\]"):
        torch.ops.qlora_ext.dora_scale(wa, a, b, sq, torch.ones(5), 1.0)
    with pytest.raises(RuntimeError, match="wa must be"):
        torch.ops.qlora_ext.dora_scale(wa.int(), a, b, sq, m, 1.0)
    with pytest.raises(RuntimeError, match="z must have dy's shape"):
        torch.ops.qlora_ext.dora_scale_backward(torch.randn(3, 6), torch.randn(2, 6), m, sq)
    with pytest.raises(RuntimeError, match="must have dy's dtype"):
        torch.ops.qlora_ext.dora_scale_backward(torch.randn(3, 6), torch.randn(3, 6), m.bfloat16(), sq)
    with pytest.raises(RuntimeError, match="inv_norm must be float32"):
        torch.ops.qlora_ext.dora_scale_backward(torch.randn(3, 6), torch.randn(3, 6), m, sq.double())
    q = qlora_ext.NF4Weight.from_float(torch.randn(6, 64))
    with pytest.raises(ValueError, match=r"magnitude and weight_sq must be \[6\]"):
        nf4_dora_linear(torch.randn(2, 64), q, None, torch.randn(2, 64), b, torch.ones(7), torch.ones(6), 1.0)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("lead,n", [((1,), 8), ((3, 5), 45), ((300,), 64), ((1030,), 24), ((4,), 1), ((0,), 5),
                                    ((2, 7), 4104)], ids=["M1", "3d-odd", "M300", "chunks", "N1", "M0", "wide"])  # fmt: skip
def test_dora_column_scale_matches_reference(lead, n, bias, dtype, device):
    """y = z ⊙ c (+ bias): the same bits as the reference (one fp32 product, one fp32 add, one
    rounding); odd widths take the scalar path, multiples of 8 the vector one on CUDA."""
    g = torch.Generator().manual_seed(n + len(lead))
    z = torch.randn(*lead, n, generator=g).to(device, dtype)
    col_scale = (torch.rand(n, generator=g) + 0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    y = dora_column_scale(z, col_scale, b)
    assert y.shape == z.shape and y.dtype == dtype and y.device == z.device
    torch.testing.assert_close(y, dora_column_scale_reference(z, col_scale, b), rtol=0, atol=0)
    if not bias:  # and PyTorch's multiply, which rounds the fp32 product once too
        torch.testing.assert_close(y, torch.mul(z, col_scale), rtol=0, atol=0)
    # a non-contiguous z gives the same result
    if z.dim() > 1 and z.numel():
        z_t = z.transpose(0, -1).contiguous().transpose(0, -1)
        torch.testing.assert_close(dora_column_scale(z_t, col_scale, b), y, rtol=0, atol=0)
    args = (z.requires_grad_(dtype == torch.float32), col_scale.requires_grad_(dtype == torch.float32),
            None if b is None else b.requires_grad_(dtype == torch.float32))  # fmt: skip
    torch.library.opcheck(torch.ops.qlora_ext.dora_column_scale.default, args)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_dora_column_scale_gradients(bias, device):
    """Autograd of the operator against autograd through the reference, and gradcheck in fp64
    (which takes the reference)."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 3, 10, generator=g).to(device).requires_grad_()
    c = (torch.rand(10, generator=g) + 0.5).to(device).requires_grad_()
    b = torch.randn(10, generator=g).to(device).requires_grad_() if bias else None
    dy = torch.randn(4, 3, 10, generator=g).to(device)
    inputs = [t for t in (z, c, b) if t is not None]
    got = torch.autograd.grad(dora_column_scale(z, c, b), inputs, dy)
    want = torch.autograd.grad(dora_column_scale_reference(z, c, b), inputs, dy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    z64, c64 = z.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: dora_column_scale(*t), (z64, c64, b64))


def test_dora_column_scale_bad_input():
    z, c = torch.randn(3, 6), torch.ones(6)
    with pytest.raises(RuntimeError, match=r"col_scale must be \[N\] = \[6\], got \[5\]"):
        torch.ops.qlora_ext.dora_column_scale(z, torch.ones(5))
    with pytest.raises(RuntimeError, match="col_scale must have z's dtype"):
        torch.ops.qlora_ext.dora_column_scale(z, c.bfloat16())
    with pytest.raises(RuntimeError, match=r"bias must be \[N\] = \[6\]"):
        torch.ops.qlora_ext.dora_column_scale(z, c, torch.ones(3))
    with pytest.raises(RuntimeError, match="bias must have z's dtype"):
        torch.ops.qlora_ext.dora_column_scale(z, c, torch.ones(6, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="z must be"):
        torch.ops.qlora_ext.dora_column_scale(z.int(), c.int())
    with pytest.raises(RuntimeError, match="0-d"):
        torch.ops.qlora_ext.dora_column_scale(torch.tensor(1.0), c)


def test_dora_output_takes_the_native_kernel_on_its_devices(monkeypatch):
    """dora_output (the DoRA layers' and fused units' y = z ⊙ c) calls the operator exactly where
    COLUMN_SCALE_DEVICES says, with the bias cast to z's dtype."""
    from qlora_ext import dora as dora_module

    calls = []
    real = torch.ops.qlora_ext.dora_column_scale

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(torch.ops.qlora_ext, "dora_column_scale", Spy())
    z, c, b = torch.randn(5, 8, dtype=torch.bfloat16), torch.rand(8, dtype=torch.bfloat16), torch.randn(8)
    y = dora_module.dora_output(z, c, b)
    assert len(calls) == 1 and calls[0][2].dtype == torch.bfloat16
    torch.testing.assert_close(y, dora_column_scale_reference(z, c, b.bfloat16()), rtol=0, atol=0)
    # narrower outputs than the device's COLUMN_SCALE_MIN_COLUMNS keep PyTorch's multiply
    monkeypatch.setattr(dora_module, "COLUMN_SCALE_MIN_COLUMNS", {"cpu": 9})
    torch.testing.assert_close(dora_module.dora_output(z, c, None), torch.mul(z, c), rtol=0, atol=0)
    assert len(calls) == 1
    wide_z, wide_c = torch.randn(5, 9, dtype=torch.bfloat16), torch.rand(9, dtype=torch.bfloat16)
    torch.testing.assert_close(dora_module.dora_output(wide_z, wide_c, None), torch.mul(wide_z, wide_c), rtol=0, atol=0)
    assert len(calls) == 2
    monkeypatch.setattr(dora_module, "COLUMN_SCALE_DEVICES", ())
    torch.testing.assert_close(dora_module.dora_output(z, c, None), torch.mul(z, c), rtol=0, atol=0)
    assert len(calls) == 2


@pytest.mark.not_under_sanitizer  # reads kernel names from torch.profiler (CUPTI)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stacked", [False, True], ids=["one-layer", "stacked"])
def test_dora_gram_kernel_runs_where_selected(stacked, monkeypatch):
    # GRAM_KERNEL_DEVICES must switch what runs: every accuracy test passes either way.
    n, r = 96, 16
    width = 2 * r if stacked else r  # two stacked layers' column blocks, or one layer's
    wa, a, b = torch.randn(n, width, device="cuda"), torch.randn(width, 64, device="cuda"), torch.randn(n, r, device="cuda")
    sq, m = torch.rand(n, device="cuda") + 1, torch.rand(n, device="cuda")

    def call():
        if stacked:
            return qlora_ext.dora.dora_scale_stacked(wa, a, b, sq, m, [40, 56], [1.0, 2.0])
        return dora_scale(wa, a, b, sq, m, 1.0)

    for devices_, want in (((), False), (("cuda",), True), ((), False)):
        monkeypatch.setattr(qlora_ext.dora, "GRAM_KERNEL_DEVICES", devices_)
        names = cuda_kernel_names(call)
        assert any("dora_gram_kernel" in k for k in names) == want, (devices_, names)
        assert any("dora_scale" in k for k in names), names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dora_ops_dispatch_cuda_kernels():
    """A CUDA build must run the CUDA kernels: this names the cause if a build silently lacks them."""
    for op in ("dora_scale", "dora_scale_stacked", "dora_scale_backward", "dora_column_scale"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qlora_ext::{op}", "CUDA"), op
