"""layers.project_together: the decode-time q/k/v and gate/up projections in one nf4_gemv_grouped
launch. Where it applies the model's outputs must not change by a bit (the grouped launch runs the
kernel nf4_gemv runs per layer, on the same tiles); where it does not, it must decline (None) so
that the layers run as usual."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from train_helpers import VOCAB, hf_model, prepared_hf

import qlora_ext
from qlora_ext import _ops, fused_blocks
from qlora_ext import block_ops
from qlora_ext.layers import project_swiglu, project_together

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")
HAS_CUDA_BUILD = torch.cuda.is_available() and qlora_ext.build_info()["with_cuda"]
requires_cuda_build = pytest.mark.skipif(not HAS_CUDA_BUILD, reason="needs a CUDA build and GPU")


def prepared(arch="llama", state="merged", dtype=torch.bfloat16, device="cuda"):
    return prepared_hf(arch, state, dtype, device)


class GroupedCalls:
    """Counts nf4_gemv_grouped_weights (count) and nf4_gemv_swiglu_weights (swiglu) calls
    (monkeypatched spies)."""

    def __init__(self, monkeypatch):
        self.count = self.swiglu = 0
        grouped, swiglu = _ops.nf4_gemv_grouped_weights, _ops.nf4_gemv_swiglu_weights

        def grouped_spy(*args, **kwargs):
            self.count += 1
            return grouped(*args, **kwargs)

        def swiglu_spy(*args, **kwargs):
            self.swiglu += 1
            return swiglu(*args, **kwargs)

        monkeypatch.setattr(_ops, "nf4_gemv_grouped_weights", grouped_spy)
        monkeypatch.setattr(_ops, "nf4_gemv_swiglu_weights", swiglu_spy)


def projections_of(model):
    layer = model.model.layers[0]
    return (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj), (
        layer.mlp.gate_proj,
        layer.mlp.up_proj,
    )


@requires_cuda_build
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases
@pytest.mark.parametrize("state", ["merged", "disabled"])
def test_decode_logits_unchanged_bit_for_bit(arch, state, monkeypatch):
    model = prepared(arch, state)
    ids = torch.randint(0, VOCAB, (1, 1), device="cuda")
    calls = GroupedCalls(monkeypatch)
    with torch.no_grad():
        grouped = model(ids).logits
    # the attention's q/k/v grouped, the MLP's gate/up with SwiGLU in the same launch, every layer
    assert calls.count == calls.swiglu == model.config.num_hidden_layers
    monkeypatch.setattr(fused_blocks, "project_swiglu", lambda gate, up, x: None)
    with torch.no_grad():
        grouped_then_swiglu = model(ids).logits
    assert calls.count == 3 * model.config.num_hidden_layers
    torch.testing.assert_close(grouped_then_swiglu, grouped, rtol=0, atol=0)
    monkeypatch.setattr(fused_blocks, "project_together", lambda layers, x: None)
    with torch.no_grad():
        separate = model(ids).logits
    torch.testing.assert_close(grouped, separate, rtol=0, atol=0)


@requires_cuda_build
def test_generate_tokens_unchanged(monkeypatch):
    model = prepared("llama", "merged")
    prompt = torch.randint(0, VOCAB, (1, 5), device="cuda")
    grouped = qlora_ext.generate(model, prompt, max_new_tokens=8)
    monkeypatch.setattr(fused_blocks, "project_together", lambda layers, x: None)
    monkeypatch.setattr(fused_blocks, "project_swiglu", lambda gate, up, x: None)
    separate = qlora_ext.generate(model, prompt, max_new_tokens=8)
    assert torch.equal(grouped, separate)


@requires_cuda_build
def test_outputs_are_the_layers_outputs():
    model = prepared("qwen2", "merged")
    attention, mlp = projections_of(model)
    x = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
    for layers in (attention, mlp):
        with torch.no_grad():
            together = project_together(layers, x)
            assert together is not None and len(together) == len(layers)
            for out, layer in zip(together, layers):
                torch.testing.assert_close(out, layer(x), rtol=0, atol=0)


@requires_cuda_build
def test_declines_where_the_layers_differ():
    model = prepared("llama", "active")
    attention, mlp = projections_of(model)
    x = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert project_together(attention, x) is None  # adapters active: the layers add their updates
    for layer in attention:
        layer.merge()
    with torch.no_grad():
        assert project_together(attention, x) is not None
        assert project_together(attention[:1], x) is None  # one layer: nothing to group
        assert project_together(attention, torch.randn(17, 64, device="cuda", dtype=torch.bfloat16)) is None  # > 16 rows
        assert project_together(attention, x.float()) is None  # fp32: not the fused GEMV route
        assert project_together(attention, x.cpu()) is None
    x_grad = x.clone().requires_grad_(True)
    assert project_together(attention, x_grad) is None  # a gradient is needed
    handle = attention[1].register_forward_hook(lambda module, args, out: out)
    with torch.no_grad():
        assert project_together(attention, x) is None  # a hook must see its layer's call
    handle.remove()
    attention[2].compute_dtype = torch.float16
    with torch.no_grad():
        assert project_together(attention, x) is None  # the layer computes in another dtype
    attention[2].compute_dtype = None
    # k's weight replaced by one of another blocksize: not groupable (the check is redone for new weights)
    k = attention[1]
    k.weight = qlora_ext.NF4Weight.from_float(k.weight.dequantize(torch.float32), blocksize=128)
    with torch.no_grad():
        assert project_together(attention, x) is None
        torch.testing.assert_close(attention[1](x).float(), x.float() @ k.weight.dequantize(torch.float32).T,
                                   rtol=2e-2, atol=2e-2)  # fmt: skip


def test_declines_on_the_cpu():
    model = prepared("llama", "merged", dtype=torch.float32, device="cpu")
    attention, mlp = projections_of(model)
    with torch.no_grad():
        assert project_together(attention, torch.randn(1, 64)) is None
        assert project_together(mlp, torch.randn(1, 64)) is None
        assert project_swiglu(*mlp, torch.randn(1, 64)) is None


# ---- the MLP's gate/up GEMV with SwiGLU in its epilogue -------------------------------------------


def _swiglu_of_together(mlp, x):
    gate, up = project_together(mlp, x)
    return block_ops.swiglu(gate.contiguous(), up.contiguous())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda_build)])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_project_swiglu_is_project_together_then_swiglu(device, arch, monkeypatch):
    """Bit for bit (the CPU: with the route forced to the GEMV, the op's composite; CUDA: the
    fused epilogue), at one row and at several, and None wherever project_together declines or a
    gradient is needed."""
    model = prepared(arch, "merged", dtype=torch.bfloat16, device=device)
    if device == "cpu":
        monkeypatch.setattr(_ops, "linear_route", lambda *a, **k: _ops.ROUTE_GEMV)
    _, mlp = projections_of(model)
    for rows in (1, 5):
        x = torch.randn(1, rows, 64, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            fused = project_swiglu(*mlp, x)
            assert fused is not None and fused.shape == (1, rows, mlp[0].out_features)
            torch.testing.assert_close(fused, _swiglu_of_together(mlp, x), rtol=0, atol=0)
    x = torch.randn(1, 1, 64, device=device, dtype=torch.bfloat16)
    assert project_swiglu(*mlp, x.clone().requires_grad_(True)) is None  # a gradient is needed
    monkeypatch.setattr(qlora_ext.layers, "SWIGLU_IN_GEMV_ENABLED", False)
    with torch.no_grad():
        assert project_swiglu(*mlp, x) is None
    monkeypatch.setattr(qlora_ext.layers, "SWIGLU_IN_GEMV_ENABLED", True)
    handle = mlp[1].register_forward_hook(lambda module, args, out: out)
    with torch.no_grad():
        assert project_swiglu(*mlp, x) is None  # a hook must see its layer's call
    handle.remove()
    attention, _ = projections_of(model)
    with torch.no_grad():
        assert project_swiglu(attention[0], attention[1], x) is None  # q and k: not one shape


# ---- decode attention over grouped K/V heads without repeating them ------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_query_grouped_attention_matches_transformers(device, dtype):
    """A decode step (one token, static cache, 4-D mask) through the fused attention forward, which
    packs the 2 query heads of each K/V head instead of repeating K and V, against the class's own
    forward on the same cache contents; and the packed path must be the one taken."""
    transformers = pytest.importorskip("transformers")
    model = hf_model("llama", dtype=dtype).to(device).eval()  # 4 heads over 2 K/V heads
    ids = torch.randint(0, VOCAB, (1, 6), device=device)
    calls = []
    real = fused_blocks._one_query_grouped_sdpa_forward
    fused_blocks._one_query_grouped_sdpa_forward = lambda *a: calls.append(1) or real(*a)
    enabled = fused_blocks.DECODE_ATTENTION_ENABLED
    fused_blocks.DECODE_ATTENTION_ENABLED = False  # the SDPA path it falls back to (test_decode_attention.py)
    try:
        outputs = []
        for fused in (False, True):
            if fused:
                qlora_ext.enable_fused_block_ops(model, devices=(device,))
            cache = transformers.StaticCache(config=model.config, max_cache_len=8)
            slots = torch.arange(8, device=device)
            prefill_mask = (slots[None, :] <= torch.arange(5, device=device)[:, None])[None, None]
            step_mask, step_position = (slots <= 5)[None, None, None, :], torch.tensor([[5]], device=device)
            with torch.no_grad():
                model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True, attention_mask=prefill_mask)
                step = model(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True, attention_mask=step_mask,
                             position_ids=step_position)  # fmt: skip
            outputs.append(step.logits.float())
    finally:
        fused_blocks._one_query_grouped_sdpa_forward = real
        fused_blocks.DECODE_ATTENTION_ENABLED = enabled
    assert len(calls) == model.config.num_hidden_layers  # the decode step took the packed path
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outputs[1], outputs[0], **tol)


# ---- the decoder layer's residual adds in the o_proj / down_proj GEMV (layers.project_add) --------


class ProjectAddCalls:
    """Counts project_add's fused launches (nf4_gemv_weight called with the residual as bias)."""

    def __init__(self, monkeypatch):
        self.fused = 0
        real = _ops.nf4_gemv_weight

        def spy(x, weight, bias=None):
            self.fused += bias is not None
            return real(x, weight, bias)

        monkeypatch.setattr(_ops, "nf4_gemv_weight", spy)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_residual_handoff_is_the_class_forward_where_it_cannot_fuse(arch, monkeypatch):
    """On the CPU (no GEMV route) and with adapters active, the decoder layer's handoff of its
    residual adds to the fused attention and MLP must give the class forward's results exactly."""
    from qlora_ext import layers as layers_module

    calls = []
    real = layers_module.project_add
    monkeypatch.setattr(fused_blocks, "project_add", lambda *a: calls.append(1) or real(*a))
    for state in ("merged", "active"):
        model = prepared(arch, state, dtype=torch.float32, device="cpu")
        ids = torch.randint(0, VOCAB, (1, 1))
        with torch.no_grad():
            plain = model(ids).logits
        qlora_ext.disable_fused_block_ops(model)  # prepare() enabled them for CUDA inputs only
        assert qlora_ext.enable_fused_block_ops(model, devices=("cpu",)) > 0
        calls.clear()
        with torch.no_grad():
            fused = model(ids).logits
        assert len(calls) == 2 * model.config.num_hidden_layers  # o_proj and down_proj of every layer
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)  # (the fused CPU norm and SwiGLU round differently)
        calls.clear()
        with torch.no_grad():
            model(torch.randint(0, VOCAB, (1, 3)))  # several rows: the class forward
        assert calls == []


@requires_cuda_build
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_residual_in_the_gemv_epilogue(arch, monkeypatch):
    """Decoding one token: o_proj and down_proj add the residual in their GEMV (one rounding of
    the sum); the logits stay within bf16 rounding of the separate adds, and with the switch off
    nothing is fused."""
    from qlora_ext import layers as layers_module

    model = prepared(arch, "merged")
    ids = torch.randint(0, VOCAB, (1, 1), device="cuda")
    calls = ProjectAddCalls(monkeypatch)
    with torch.no_grad():
        fused = model(ids).logits.float()
    assert calls.fused == 2 * model.config.num_hidden_layers
    monkeypatch.setattr(layers_module, "RESIDUAL_IN_GEMV_ENABLED", False)
    calls.fused = 0
    with torch.no_grad():
        separate = model(ids).logits.float()
    assert calls.fused == 0
    torch.testing.assert_close(fused, separate, rtol=0.05, atol=0.05 * separate.abs().max().item())


@requires_cuda_build
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_project_add_is_one_rounding_of_the_exact_sum(dtype):
    """project_add's one-row result is the fp32 product plus the residual rounded once: within
    half an ulp of the exact sum where layer(x) + residual (two roundings) is within one ulp."""
    from qlora_ext.layers import project_add

    model = prepared("llama", "merged", dtype=dtype)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(1, 1, layer.in_features, device="cuda", dtype=dtype)
    residual = torch.randn(1, 1, layer.out_features, device="cuda", dtype=dtype) * 4
    with torch.no_grad():
        fused = project_add(layer, x, residual)
        separate = layer(x) + residual
        exact = (x.float() @ layer.weight.dequantize(torch.float32).t()) + residual.float()
    assert fused.dtype == dtype and fused.shape == residual.shape
    fused_err = (fused.float() - exact).abs().max().item()
    separate_err = (separate.float() - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert fused_err <= separate_err + 0.5 * ulp, (fused_err, separate_err)
    assert fused_err <= 0.5 * ulp + 1e-4 * exact.abs().max().item()


def test_stacked_bias_is_remembered_until_a_bias_changes():
    """project_together's concatenated q/k/v bias (Qwen2) is built once, and again after a bias is
    written in place or replaced."""
    from qlora_ext.layers import _stacked_bias

    model = prepared("qwen2", "merged", dtype=torch.float32, device="cpu")
    attention = model.model.layers[0].self_attn
    layers = (attention.q_proj, attention.k_proj, attention.v_proj)
    x = torch.randn(1, 64)
    first = _stacked_bias(layers[0], layers, x)
    assert torch.equal(first, torch.cat([layer.bias for layer in layers]))
    assert _stacked_bias(layers[0], layers, x) is first
    with torch.no_grad():
        layers[1].bias.add_(1.0)
    second = _stacked_bias(layers[0], layers, x)
    assert second is not first and torch.equal(second, torch.cat([layer.bias for layer in layers]))
    layers[2].bias = torch.nn.Parameter(torch.zeros_like(layers[2].bias))
    third = _stacked_bias(layers[0], layers, x)
    assert third is not second and torch.equal(third, torch.cat([layer.bias for layer in layers]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_project_add_fused_branch_on_the_cpu(dtype, monkeypatch):
    """project_add's one-launch branch (the residual as nf4_gemv's bias) runs through the CPU
    nf4_gemv when the route is forced to the GEMV: its shapes and views, and its one rounding,
    checked where CI runs (the CUDA branch differs only in the kernel)."""
    from qlora_ext.layers import project_add

    model = prepared("llama", "merged", dtype=dtype, device="cpu")
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(1, 1, layer.in_features).to(dtype)
    residual = (torch.randn(1, 1, layer.out_features) * 4).to(dtype)
    monkeypatch.setattr(_ops, "linear_route", lambda *a, **k: _ops.ROUTE_GEMV)
    calls = ProjectAddCalls(monkeypatch)
    with torch.no_grad():
        fused = project_add(layer, x, residual)
    assert calls.fused == 1 and fused.shape == residual.shape and fused.dtype == dtype
    with torch.no_grad():
        exact = x.float() @ layer.weight.dequantize(torch.float32).t() + residual.float()
    # one rounding of the fp32 sum (the CPU kernel's dot product order aside)
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert (fused.float() - exact).abs().max().item() <= 0.5 * ulp + 1e-5 * exact.abs().max().item()
    # several rows, or a residual needing a gradient: the plain sum
    rows = torch.randn(1, 3, layer.in_features).to(dtype)
    with torch.no_grad():
        plain = project_add(layer, rows, residual.expand(1, 3, -1).contiguous())
    assert calls.fused == 1 and plain.shape == (1, 3, layer.out_features)
