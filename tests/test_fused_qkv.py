"""The fused LoRA Q/K/V projections (qlora_ext.fused_qkv): the same loss and gradients as the
module-by-module path, used exactly where it applies, stepping aside everywhere else."""

from __future__ import annotations

import pytest
import torch
from train_helpers import CountDoRANorms, CountGemms, sgd_step, train_side_by_side, assert_fused_bf16_within_twice_the_modules, builtin_tiny_llama, llama_with_biases, train_biases, CountApplies, force_fused_linear_route, lm_loss, trainable_grads, devices, hf_config, hf_model, randomize_adapters, token_batch

import qlora_ext
from qlora_ext import fused_qkv
from qlora_ext.layers import QLoRALinear
from qlora_ext.lora_linear import _weight_args

LAYERS = 2


def _model(kind="llama", method="lora", dropout=0.0, fused=True, device="cpu", dtype=torch.float32, seed=1,
           checkpointing="resident", **prepare_kwargs):  # fmt: skip
    if kind == "builtin":
        model = builtin_tiny_llama(dtype, LAYERS)
    elif kind == "llama-attn-bias":
        model = llama_with_biases("attention_bias", _qkv_of_layer, dtype)
    elif kind == "qwen3":  # q/k norms between the projections and RoPE
        transformers = pytest.importorskip("transformers")
        if not hasattr(transformers, "Qwen3Config"):
            pytest.skip("this transformers has no Qwen3")
        common = hf_config("llama").to_dict()
        config = transformers.Qwen3Config(**{k: common[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")}, head_dim=16)  # fmt: skip
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    else:
        model = hf_model(kind, dtype=dtype)
    torch.manual_seed(3)
    qlora_ext.prepare(model, r=4, alpha=8, dropout=dropout, method=method, verbose=False, fused_qkv=fused,
                      gradient_checkpointing=checkpointing != "off", offload_checkpoints=checkpointing == "offload",
                      **prepare_kwargs)  # fmt: skip
    randomize_adapters(model, seed=seed)
    if kind == "llama-attn-bias":
        train_biases(model, _qkv_of_layer)
    return model.to(device).train()


def _qkv(attn):
    return attn.q_proj, attn.k_proj, attn.v_proj


def _qkv_of_layer(layer):
    return _qkv(layer.self_attn)


def _attentions(model):
    return [layer.self_attn for layer in model.model.layers]


_loss = lm_loss


_grads = trainable_grads


def _CountCalls(monkeypatch):
    return CountApplies(monkeypatch, fused_qkv._LoRAQKV)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "builtin", "llama-attn-bias"])
@pytest.mark.parametrize("checkpointing", ["off", "resident", "offload"])
@pytest.mark.parametrize("concat", [True, False], ids=["concat", "three-gemms"])
def test_same_loss_and_gradients_as_the_modules(device, kind, checkpointing, concat, monkeypatch):
    if kind == "builtin" and checkpointing == "offload":
        pytest.skip("offloading needs transformers' per-layer hooks (prepare refuses it for TinyLlama)")
    monkeypatch.setattr(fused_qkv, "CONCAT_WEIGHTS", concat)
    calls = _CountCalls(monkeypatch)
    fused = _model(kind, device=device, checkpointing=checkpointing)
    plain = _model(kind, fused=False, device=device, checkpointing=checkpointing)
    assert all(fused_qkv.is_fused_qkv(a) for a in _attentions(fused))
    assert not any(fused_qkv.is_fused_qkv(a) for a in _attentions(plain))
    assert fused_qkv.enable_fused_qkv(fused) == 0  # already on
    steps = 3
    # every q/k/v adapter factor is checked (and every q/k/v bias where they train)
    per_layer = 3 * (3 if kind == "llama-attn-bias" else 2)
    for want in train_side_by_side(fused, plain, device, steps):
        assert sum(any(p in n for p in ("q_proj", "k_proj", "v_proj")) for n in want) == LAYERS * per_layer
    # Checkpointing runs each attention twice per step (forward, then recompute in backward).
    assert calls.n == steps * LAYERS * (1 if checkpointing == "off" else 2)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weights_dequantized_into_one_buffer_equal_the_concatenation(device, dtype, monkeypatch):
    """The concatenated weights: dequantized into row ranges of one buffer (DEQUANTIZE_INTO_DEVICES)
    or apart and copied by torch.cat, the same bits; and the buffer path is the one taken on the
    devices it lists, for weights stored in the compute dtype."""
    torch.manual_seed(1)
    weights = [qlora_ext.NF4Weight.from_float(torch.randn(n, 48, dtype=dtype, device=device), double_quant=dq)
               for n, dq in ((64, True), (16, False), (16, True))]  # fmt: skip
    specs = [_weight_args(w) for w in weights]
    assert all(spec[8] == dtype for spec in specs)
    monkeypatch.setattr(fused_qkv, "DEQUANTIZE_INTO_DEVICES", (device,))
    calls = []
    real = fused_qkv._ops.nf4_dequantize_into
    monkeypatch.setattr(fused_qkv._ops, "nf4_dequantize_into", lambda *a: calls.append(a) or real(*a))
    buffered = fused_qkv._dequantized(specs, dtype, concat=True)
    assert len(calls) == 3 and buffered.shape == (96, 48) and buffered.dtype == dtype
    monkeypatch.setattr(fused_qkv, "DEQUANTIZE_INTO_DEVICES", ())
    assert torch.equal(buffered, fused_qkv._dequantized(specs, dtype, concat=True)) and len(calls) == 3
    # stored in fp32, computed in bf16: dequantize, then cast (the buffer path does not apply)
    if dtype == torch.float32:
        monkeypatch.setattr(fused_qkv, "DEQUANTIZE_INTO_DEVICES", (device,))
        cast = fused_qkv._dequantized(specs, torch.bfloat16, concat=True)
        assert len(calls) == 3 and torch.equal(cast, buffered.to(torch.bfloat16))


def _three_layers(r=(4, 2, 3), alpha=(8, 3, 3), rslora=(False, True, False), bias=True, dtype=torch.float32):
    """Three QLoRALinear layers on one input (K 48; N 64, 16, 16), each with its own rank and scale
    (2, 3/√2 and 1: a scale of one skips its multiplications)."""
    torch.manual_seed(0)
    layers = []
    for n, r_i, a_i, rs_i in zip((64, 16, 16), r, alpha, rslora):
        linear = torch.nn.Linear(48, n, bias=bias)
        layer = QLoRALinear.from_linear(linear)
        layer.add_adapter("a", r=r_i, alpha=a_i, rslora=rs_i)
        randomize_adapters(layer, seed=n + r_i)
        if bias:
            layer.bias.requires_grad_(True)
        layers.append(layer.to(dtype))
    return layers


@pytest.mark.parametrize("concat", [True, False], ids=["concat", "three-gemms"])
@pytest.mark.parametrize("block_diagonal", [True, False], ids=["block-diagonal-b", "three-bs"])
def test_unit_with_different_ranks_and_scales_matches_the_modules(concat, block_diagonal, monkeypatch):
    monkeypatch.setattr(fused_qkv, "CONCAT_WEIGHTS", concat)
    monkeypatch.setattr(fused_qkv, "BLOCK_DIAGONAL_B_DEVICES", ("cpu",) if block_diagonal else ())
    layers = _three_layers()
    assert len({a.scale for a in (layer.current_adapter() for layer in layers)}) == 3
    x = torch.randn(2, 5, 48, requires_grad=True)
    weights = [torch.randn(2, 5, layer.out_features) for layer in layers]
    params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    assert len(params) == 9  # three biases, three A, three B

    def run(outputs):
        loss = sum((o * w).sum() for o, w in zip(outputs, weights))
        return [o.detach() for o in outputs], torch.autograd.grad(loss, [x, *params])

    with CountGemms() as gemms:
        got_out, got = run(fused_qkv.lora_qkv(x, *layers))
    want_out, want = run([layer(x) for layer in layers])
    for a, b in zip((*got_out, *got), (*want_out, *want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # GEMMs. Forward: the base (one on the concatenated weights, else three), x·Aᵀ, the updates
    # (one with the block-diagonal B, else three). Backward: g (one, else three), dx (one, else
    # three) and its low-rank part, dA, the three dB.
    base = 1 if concat else 3
    updates = 1 if concat and block_diagonal else 3
    assert gemms.n == (base + 1 + updates) + (updates + base + 1 + 1 + 3)


@pytest.mark.parametrize("concat", [True, False], ids=["concat", "three-gemms"])
@pytest.mark.parametrize("block_diagonal", [True, False], ids=["block-diagonal-b", "three-bs"])
def test_unit_gradcheck_fp64(concat, block_diagonal, monkeypatch):
    monkeypatch.setattr(fused_qkv, "CONCAT_WEIGHTS", concat)
    monkeypatch.setattr(fused_qkv, "BLOCK_DIAGONAL_B_DEVICES", ("cpu",) if block_diagonal else ())
    layers = _three_layers(dtype=torch.float64)
    params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    x = torch.randn(1, 3, 48, dtype=torch.float64, requires_grad=True)
    calls = _CountCalls(monkeypatch)

    def f(x, *_params):  # the parameters are perturbed in place; the unit reads them
        return fused_qkv.lora_qkv(x, *layers)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert calls.n > 0


@pytest.mark.parametrize("block_diagonal", [True, False])
def test_nothing_dense_is_kept_for_backward(block_diagonal, monkeypatch):
    # Saved: x, x·[Aq;Ak;Av]ᵀ, the cast adapters; never a dequantized weight [N, K].
    monkeypatch.setattr(fused_qkv, "BLOCK_DIAGONAL_B_DEVICES", ("cpu",) if block_diagonal else ())
    layers = _three_layers()
    x = torch.randn(2, 5, 48, requires_grad=True)
    q, _, _ = fused_qkv.lora_qkv(x, *layers)
    saved = q.grad_fn.saved_tensors
    assert any(t is x or (t.shape == x.shape and t.data_ptr() == x.data_ptr()) for t in saved)
    shapes = [tuple(t.shape) for t in saved]
    assert not {(64, 48), (16, 48), (96, 48)} & set(shapes), shapes  # no dequantized W
    # x, xa [10, 9], [Aq; Ak; Av] [9, 48] and the B's [N_i, r_i] (or their block-diagonal [96, 9]): nothing else
    bs = 96 * 9 if block_diagonal else 64 * 4 + 16 * 2 + 16 * 3
    assert sum(t.numel() for t in saved) == x.numel() + 10 * 9 + 9 * 48 + bs, shapes


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["lora", "dora", "dora-concat", "dora-concat-stacked"])
def test_bf16_error_within_twice_the_module_paths(device, kind, method, monkeypatch):
    """FlashAttention's rule: against an fp32 run of the same weights, the fused bf16 path errs at
    most twice as much as the module-by-module bf16 path."""
    monkeypatch.setattr(fused_qkv, "DORA_DEVICES", ("cpu", "cuda"))
    if method == "lora":
        calls = CountApplies(monkeypatch, fused_qkv._LoRAQKV)
    else:
        calls = _dora_unit(monkeypatch, {"dora": "", "dora-concat": "concat", "dora-concat-stacked": "stacked"}[method])
        method = "dora"
    ids = token_batch(batch=2, seq=16, seed=7).to(device)
    assert_fused_bf16_within_twice_the_modules(
        lambda fused: _model(kind, method=method, fused=fused, device=device, dtype=torch.float32), ids)
    assert calls.n > 0


def test_bf16_activations_with_fp32_adapters_match_the_modules():
    # Mixed dtypes (the usual setup): adapters fp32, activations bf16; gradients return in fp32.
    _check_bf16_activations_with_fp32_adapters([layer.to(torch.bfloat16) for layer in _three_layers()])


def _check_bf16_activations_with_fp32_adapters(layers):
    """The unit on bf16 layers whose adapters are made fp32, against the modules: outputs in bf16,
    each gradient in its parameter's dtype, both within bf16 rounding."""
    for layer in layers:
        layer.current_adapter().float()
    x = torch.randn(2, 5, 48, dtype=torch.bfloat16, requires_grad=True)
    params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    outs = fused_qkv.lora_qkv(x, *layers)
    grads = torch.autograd.grad(sum(o.float().square().sum() for o in outs), [x, *params])
    want_outs = [layer(x) for layer in layers]
    want = torch.autograd.grad(sum(o.float().square().sum() for o in want_outs), [x, *params])
    for a, b in zip(outs, want_outs):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    for p, a, b in zip([x, *params], grads, want):
        assert a.dtype == p.dtype
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("method, dropout", [("vera", 0.0), ("lora_fa", 0.0), ("delta_lora", 0.0), ("lora", 0.1),
                                             ("dora", 0.1)])  # fmt: skip
def test_other_adapters_and_dropout_take_the_modules(method, dropout, monkeypatch):
    calls = _CountCalls(monkeypatch)
    dora_calls = _CountDoRAUnits(monkeypatch)
    model = _model(method=method, dropout=dropout)
    assert all(fused_qkv.is_fused_qkv(a) for a in _attentions(model))  # wired; steps aside at call time
    _loss(model, token_batch()).backward()
    assert calls.n == 0
    model.eval()  # dropout is off in eval: plain LoRA is fused again
    with torch.no_grad():
        _loss(model, token_batch())
    assert calls.n == (LAYERS if method == "lora" else 0)
    assert dora_calls.n == (LAYERS if method == "dora" else 0)


def test_dropout_training_gives_the_modules_results(monkeypatch):
    # Stepping aside must not change anything: the same RNG draws, in the same order.
    ids = token_batch()
    losses = []
    for fused in (True, False):
        model = _model(dropout=0.1, fused=fused)
        torch.manual_seed(5)
        losses.append(_loss(model, ids))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


def test_a_lora_and_another_adapter_in_one_attention_take_the_modules(monkeypatch):
    from qlora_ext.dora import DoRAAdapter

    calls = _CountCalls(monkeypatch)
    model = _model()
    k_proj = model.model.layers[0].self_attn.k_proj
    k_proj.add_adapter("d", DoRAAdapter(64, k_proj.out_features, r=4))
    k_proj.set_adapter("d")
    _loss(model, token_batch()).backward()
    assert calls.n == 2 * 1  # layer 1 fused (forward and recompute); layer 0 not


@pytest.mark.parametrize("how", ["disabled", "merged", "no-adapter", "compute-dtype"])
def test_disabled_merged_or_recast_layers_take_the_modules(how, monkeypatch):
    from qlora_ext.prepare import qlora_layers

    calls = _CountCalls(monkeypatch)
    model = _model()
    for layer in qlora_layers(model).values():
        if how == "disabled":
            layer.disable_adapters()
        elif how == "merged":
            layer.merge()
        elif how == "no-adapter":
            layer.set_adapter(None)
        else:
            layer.compute_dtype = torch.float64
    with torch.no_grad():
        _loss(model, token_batch())
    assert calls.n == 0


def test_non_float_input_and_compile_take_the_modules(monkeypatch):
    layers = _three_layers()
    assert fused_qkv.lora_qkv(torch.zeros(2, 48, dtype=torch.int64), *layers) is None
    assert fused_qkv.lora_qkv(torch.zeros(2, 48), *layers) is not None
    # Under torch.compile the graph needs the registered operators: the modules take it.
    monkeypatch.setattr(fused_qkv, "use_operators", lambda: True)
    assert fused_qkv.lora_qkv(torch.zeros(2, 48), *layers) is None


def test_inference_the_fused_kernels_serve_takes_the_modules(monkeypatch):
    # Decode/prefill that linear_route sends to nf4_gemv/nf4_gemm must not run the unit (it would
    # dequantize all three weights per token). The route needs CUDA; forced here on the CPU.

    calls = _CountCalls(monkeypatch)
    model = _model().eval()
    ids = token_batch()
    with torch.no_grad():
        want = _loss(model, ids)
    assert calls.n == LAYERS  # dense route (CPU): the unit runs, once per layer
    routes = force_fused_linear_route(monkeypatch)
    with torch.no_grad():
        got = _loss(model, ids)
    assert calls.n == LAYERS and "lora_qkv" in routes
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_second_backward_adds_the_same_gradients(method):
    # Nothing the unit saves is overwritten by its backward: retain_graph works (LoRA and DoRA units).
    layers = _three_layers() if method == "lora" else _three_dora_layers()
    x = torch.randn(2, 5, 48, requires_grad=True)
    outs = fused_qkv.lora_qkv(x, *layers)
    leaves = [x, *(p for layer in layers for p in layer.parameters() if p.requires_grad)]
    sum(o.square().sum() for o in outs).backward(retain_graph=True)
    first = [p.grad.clone() for p in leaves]
    sum(o.square().sum() for o in outs).backward()
    for p, g in zip(leaves, first):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-6, atol=1e-7)


def test_an_unused_output_gets_zero_gradient():
    layers = _three_layers()
    x = torch.randn(2, 5, 48, requires_grad=True)
    q, _, v = fused_qkv.lora_qkv(x, *layers)
    (q.sum() + v.square().sum()).backward()
    want_x = torch.autograd.grad(layers[0](x).sum() + layers[2](x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, want_x, rtol=1e-5, atol=1e-6)
    k_adapter = layers[1].current_adapter()
    assert float(k_adapter.lora_A.weight.grad.abs().max()) == 0.0
    assert float(k_adapter.lora_B.weight.grad.abs().max()) == 0.0


def test_block_ops_and_fused_qkv_undo_in_either_order():
    from qlora_ext.fused_blocks import disable_fused_block_ops, enable_fused_block_ops

    ids = token_batch()
    want = _loss(_model(fused=False), ids)
    for first_blocks in (True, False):
        model = _model()
        enable_fused_block_ops(model, devices=("cpu",))  # (prepare's default is CUDA only)
        if first_blocks:
            disable_fused_block_ops(model)
            fused_qkv.disable_fused_qkv(model)
        else:
            fused_qkv.disable_fused_qkv(model)
            disable_fused_block_ops(model)
        assert all("forward" not in a.__dict__ for a in _attentions(model))
        torch.testing.assert_close(_loss(model, ids), want)


def test_fused_qkv_with_the_fused_rope(monkeypatch):
    # With fused_block_ops on for the CPU, the unit's q/k/v go through block_ops' RoPE, whatever
    # order the two were enabled in; the result is the block-op path's with the modules.
    from qlora_ext.fused_blocks import enable_fused_block_ops

    ids = token_batch(seed=4)
    plain = _model(fused=False, fused_block_ops=False)
    enable_fused_block_ops(plain, devices=("cpu",))
    want = _loss(plain, ids)
    want.backward()
    for order in ("blocks-first", "qkv-first"):
        calls = _CountCalls(monkeypatch)
        if order == "blocks-first":
            model = _model(fused=False, fused_block_ops=False)
            enable_fused_block_ops(model, devices=("cpu",))
            assert fused_qkv.enable_fused_qkv(model) == LAYERS
        else:
            model = _model(fused_block_ops=False)
            enable_fused_block_ops(model, devices=("cpu",))
        loss = _loss(model, ids)
        loss.backward()
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
        assert calls.n == 2 * LAYERS
        fused_qkv.disable_fused_qkv(model)  # the block ops' attention forward is what remains
        assert all(getattr(a.forward, "__func__", None).__name__ == "_hf_attention_forward" for a in _attentions(model))


def test_prepare_switch():
    assert not any(fused_qkv.is_fused_qkv(a) for a in _attentions(_model(fused=False)))
    assert all(fused_qkv.is_fused_qkv(a) for a in _attentions(_model(fused=None)))
    assert all(fused_qkv.is_fused_qkv(a) for a in _attentions(_model(fused=True)))
    # q/k/v not adapted: nothing to fuse; None accepts that, True insists
    only_mlp = dict(target_modules=["gate_proj", "up_proj", "down_proj"])
    assert not any(fused_qkv.is_fused_qkv(a) for a in _attentions(_model(fused=None, **only_mlp)))
    with pytest.raises(ValueError, match="fused_qkv=True"):
        _model(fused=True, **only_mlp)
    with pytest.raises(ValueError, match="fused_qkv=True"):
        qlora_ext.prepare(hf_model("gpt2"), verbose=False, fused_qkv=True)


def test_save_load_and_merge_are_unaffected(tmp_path):
    ids = token_batch(seed=9)
    fused = _model(seed=4)
    _loss(fused, ids).backward()
    sgd_step(fused)
    fused.eval()
    qlora_ext.save_adapter(fused, tmp_path / "adapter")
    plain = _model(fused=False, seed=11).eval()  # other adapter values, overwritten by the load
    qlora_ext.load_adapter(plain, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(_loss(fused, ids), _loss(plain, ids), rtol=1e-6, atol=1e-6)
        merged = {k: v.clone() for k, v in qlora_ext.merged_state_dict(fused, adapter_name="default").items()}
        want = qlora_ext.merged_state_dict(plain, adapter_name="default")
        assert merged.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(merged[k], want[k], rtol=0, atol=0, msg=k)


def test_deepcopy_keeps_the_unit_bound_to_the_copy(monkeypatch):
    import copy

    model = _model()
    clone = copy.deepcopy(model)
    for a, b in zip(_attentions(model), _attentions(clone)):
        assert fused_qkv.is_fused_qkv(b) and b.forward.__self__ is b and b._qlora_unfused_forward.__self__ is b
    calls = _CountCalls(monkeypatch)
    ids = token_batch()
    torch.testing.assert_close(_loss(clone, ids), _loss(model, ids))
    assert calls.n == 2 * LAYERS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_on_cuda_reads_the_packed_weights():
    model = _model("llama", device="cuda").to(torch.bfloat16).eval()
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 1, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert fused_qkv.lora_qkv(x, *_qkv(attn)) is None
    big = torch.randn(1, 300, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # beyond nf4_gemm's rows: the dense route, the unit runs
        got = fused_qkv.lora_qkv(big, *_qkv(attn))
        want = [p(big) for p in _qkv(attn)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


# ---- DoRA (_DoRAQKV) ----------------------------------------------------------------------------


# The DoRA units: on the concatenated weights (_DoRAQKVConcat) with its three norms in one call
# ("stacked") or one by one, and per projection (_DoRAQKV). `concat` is truthy for the first two.
DORA_UNITS = pytest.mark.parametrize("concat", ["stacked", "concat", ""],
                                     ids=["dora-concat-stacked", "dora-concat", "dora-per-projection"])  # fmt: skip


def _dora_unit(monkeypatch, concat: str) -> CountApplies:
    """Selects one DoRA unit on every device type (DORA_CONCAT_DEVICES, and for "stacked"
    DORA_STACKED_NORM_DEVICES) and counts its calls."""
    monkeypatch.setattr(fused_qkv, "DORA_CONCAT_DEVICES", ("cpu", "cuda") if concat else ())
    monkeypatch.setattr(fused_qkv, "DORA_STACKED_NORM_DEVICES", ("cpu", "cuda") if concat == "stacked" else ())
    return CountApplies(monkeypatch, fused_qkv._DoRAQKVConcat if concat else fused_qkv._DoRAQKV)


class _CountDoRAUnits:
    """Calls of either DoRA unit."""

    def __init__(self, monkeypatch):
        self.counts = [CountApplies(monkeypatch, unit) for unit in (fused_qkv._DoRAQKVConcat, fused_qkv._DoRAQKV)]

    @property
    def n(self) -> int:
        return sum(c.n for c in self.counts)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("kind", ["llama", "builtin", "llama-attn-bias"])
@pytest.mark.parametrize("checkpointing", ["off", "resident", "offload"])
@DORA_UNITS
def test_dora_same_loss_and_gradients_as_the_modules(device, kind, checkpointing, concat, monkeypatch):
    if kind == "builtin" and checkpointing == "offload":
        pytest.skip("offloading needs transformers' per-layer hooks (prepare refuses it for TinyLlama)")
    # Pinned, so that the test covers the unit on both device types whatever the default.
    monkeypatch.setattr(fused_qkv, "DORA_DEVICES", ("cpu", "cuda"))
    calls, lora_calls = _dora_unit(monkeypatch, concat), _CountCalls(monkeypatch)
    fused = _model(kind, method="dora", device=device, checkpointing=checkpointing)
    plain = _model(kind, method="dora", fused=False, device=device, checkpointing=checkpointing)
    steps = 3
    # every q/k/v A, B and magnitude is checked (and every q/k/v bias where they train)
    for want in train_side_by_side(fused, plain, device, steps):
        qkv = [n for n in want if any(p in n for p in ("q_proj", "k_proj", "v_proj"))]
        assert sum("lora_magnitude_vector" in n for n in qkv) == LAYERS * 3
        assert len(qkv) == LAYERS * 3 * (4 if kind == "llama-attn-bias" else 3)
    assert calls.n == steps * LAYERS * (1 if checkpointing == "off" else 2) and lora_calls.n == 0


def _three_dora_layers(dtype=torch.float32, bias=True, concat: str = ""):
    """_three_layers with DoRA adapters: own ranks and scales, magnitudes initialised from W then
    perturbed (so that c = m/n is not 1). For the "stacked" unit one rank (4, the norms' one call
    needs it) and still their own scales."""
    from qlora_ext.dora import DoRAAdapter

    torch.manual_seed(0)
    layers = []
    ranks = (4, 4, 4) if concat == "stacked" else (4, 2, 3)
    for n, r_i, a_i in zip((64, 16, 16), ranks, (8, 3, 5)):
        layer = QLoRALinear.from_linear(torch.nn.Linear(48, n, bias=bias))
        layer.add_adapter("d", DoRAAdapter(48, n, r=r_i, alpha=a_i))
        layer.set_adapter("d")
        randomize_adapters(layer, seed=n + r_i)
        adapter = layer.current_adapter()
        adapter.init_magnitude(layer)
        with torch.no_grad():
            adapter.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(n))
        if bias:
            layer.bias.requires_grad_(True)
        layers.append(layer.to(dtype))
    return layers


def _qkv_params(layers):
    params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    assert len(params) == 12  # three biases, A's, B's and magnitudes
    return params


@DORA_UNITS
def test_dora_unit_matches_the_modules(concat, monkeypatch):
    calls = _dora_unit(monkeypatch, concat)
    layers = _three_dora_layers(concat=concat)
    x = torch.randn(2, 5, 48, requires_grad=True)
    weights = [torch.randn(2, 5, layer.out_features) for layer in layers]
    params = _qkv_params(layers)

    def run(outputs):
        loss = sum((o * w).sum() for o, w in zip(outputs, weights))
        return [o.detach() for o in outputs], torch.autograd.grad(loss, [x, *params])

    got_out, got = run(fused_qkv.lora_qkv(x, *layers))
    assert calls.n == 1
    want_out, want = run([layer(x) for layer in layers])
    # Against the same layers in fp64 (the NF4 codes unchanged), every output and gradient of the
    # unit errs at most twice as much as the modules', plus four fp32 roundings of the tensor's
    # largest element (both are fp32 round-off, and the concatenated GEMMs block their sums
    # differently; over 30 seeds the concatenated units needed at most 0.96 such roundings).
    for layer in layers:
        layer.double()
    x64 = x.detach().double().requires_grad_()
    params64 = _qkv_params(layers)
    loss64 = sum((layer(x64) * w.double()).sum() for layer, w in zip(layers, weights))
    truth = [layer(x64).detach() for layer in layers] + list(torch.autograd.grad(loss64, [x64, *params64]))
    eps = torch.finfo(torch.float32).eps
    for g, w, t in zip((*got_out, *got), (*want_out, *want), truth):
        err, base = (g.double() - t).abs().max(), (w.double() - t).abs().max()
        assert err <= 2 * base + 4 * eps * t.abs().max(), (float(err), float(base))


@pytest.mark.parametrize("ranks_differ", [False, True], ids=["one-rank", "ranks-differ"])
def test_dora_norms_stacked_only_for_one_rank(ranks_differ, monkeypatch):
    # dora_scale_stacked takes one rank: three that differ take the norms one by one.
    calls, norms = _dora_unit(monkeypatch, "stacked"), CountDoRANorms(monkeypatch)
    layers = _three_dora_layers(concat="" if ranks_differ else "stacked")
    fused_qkv.lora_qkv(torch.randn(2, 5, 48), *layers)
    assert calls.n == 1 and norms.n == 3
    assert norms.stacked_calls == (0 if ranks_differ else 1)


@DORA_UNITS
def test_dora_unit_bf16_activations_with_fp32_adapters_match_the_modules(concat, monkeypatch):
    # The usual setup: weights and activations bf16, A, B and m fp32; their gradients return in fp32.
    calls = _dora_unit(monkeypatch, concat)
    layers = _three_dora_layers(dtype=torch.bfloat16, concat=concat)
    _qkv_params(layers)  # every bias, A, B and magnitude trains
    _check_bf16_activations_with_fp32_adapters(layers)
    assert calls.n == 1


@DORA_UNITS
def test_dora_unit_gradcheck_fp64(concat, monkeypatch):
    # Finite differences in fp64 for the input, the biases and the magnitudes. (A and B are
    # excluded by design: DoRA's norm is detached (paper §4.3), so their analytic gradients differ
    # from the numeric ones; test_dora_unit_matches_the_modules checks them against the modules.)
    layers = _three_dora_layers(dtype=torch.float64, concat=concat)
    params = [p for layer in layers for n, p in layer.named_parameters()
              if p.requires_grad and ("magnitude" in n or n == "bias")]  # fmt: skip
    assert len(params) == 6
    x = torch.randn(1, 3, 48, dtype=torch.float64, requires_grad=True)
    calls = _dora_unit(monkeypatch, concat)

    def f(x, *_params):  # the parameters are perturbed in place; the unit reads them
        return fused_qkv.lora_qkv(x, *layers)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert calls.n > 0


@DORA_UNITS
def test_dora_unit_unused_output_and_input_without_grad(concat, monkeypatch):
    calls = _dora_unit(monkeypatch, concat)
    layers = _three_dora_layers(concat=concat)
    x = torch.randn(2, 5, 48, requires_grad=True)
    q, _, v = fused_qkv.lora_qkv(x, *layers)
    (q.sum() + v.square().sum()).backward()
    want_x = torch.autograd.grad(layers[0](x).sum() + layers[2](x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, want_x, rtol=1e-5, atol=1e-6)
    # k's output reached no loss: its parameters get no gradient, as through the module
    assert all(p.grad is None for p in layers[1].parameters())
    # an input that needs no gradient (the first layer's, after a frozen embedding) gets none
    x0 = torch.randn(2, 5, 48)
    sum(o.sum() for o in fused_qkv.lora_qkv(x0, *layers)).backward()
    assert x0.grad is None and layers[1].current_adapter().lora_magnitude_vector.grad is not None
    assert calls.n == 2


@DORA_UNITS
def test_dora_norms_computed_once_per_step_under_checkpointing(concat, monkeypatch):
    # The recomputation reuses the first forward's norms: they are computed as often with
    # checkpointing as without it (q, k, v, the fused MLP's three and o_proj: 7 per layer).
    norms = CountDoRANorms(monkeypatch)
    calls = _dora_unit(monkeypatch, concat)
    for checkpointing in ("off", "resident"):
        norms.n = norms.stacked_calls = 0
        _loss(_model(method="dora", checkpointing=checkpointing), token_batch()).backward()
        assert norms.n == LAYERS * 7, checkpointing
        assert norms.stacked_calls == (LAYERS if concat == "stacked" else 0)  # q, k, v's in one call
    assert calls.n == LAYERS * 3  # once without checkpointing, twice with


def test_dora_lora_mix_and_other_devices_take_the_modules(monkeypatch):
    from qlora_ext.adapters import LoRAAdapter

    calls, lora_calls = _CountDoRAUnits(monkeypatch), _CountCalls(monkeypatch)
    ids = token_batch()
    model = _model(method="dora", checkpointing="off")
    want = _loss(model, ids)
    assert calls.n == LAYERS
    k_proj = model.model.layers[0].self_attn.k_proj  # layer 0: DoRA, LoRA, DoRA
    k_proj.add_adapter("l", LoRAAdapter(64, k_proj.out_features, r=4))
    k_proj.set_adapter("l")
    _loss(model, ids)
    assert calls.n == LAYERS + (LAYERS - 1) and lora_calls.n == 0
    k_proj.set_adapter("default")
    monkeypatch.setattr(fused_qkv, "DORA_DEVICES", ())  # DoRA not enabled on this device type
    got = _loss(model, ids)
    assert calls.n == 2 * LAYERS - 1 and lora_calls.n == 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@DORA_UNITS
def test_dora_unit_keeps_x_once_and_nothing_dense(concat, monkeypatch):
    _dora_unit(monkeypatch, concat)
    layers = _three_dora_layers(concat=concat)
    x = torch.randn(2, 5, 48, requires_grad=True)
    q, _, _ = fused_qkv.lora_qkv(x, *layers)
    saved = q.grad_fn.saved_tensors
    assert sum(t.shape == x.shape and t.data_ptr() == x.data_ptr() for t in saved) == 1
    shapes = [tuple(t.shape) for t in saved]
    assert not {(64, 48), (16, 48)} & set(shapes), shapes  # no dequantized W
    # z is kept (for dm), as by the DoRA module: per projection [2, 5, N], or all three as [10, 96]
    if concat:
        assert shapes.count((10, 96)) == 1, shapes
    else:
        assert sum(s == (2, 5, n) for s in shapes for n in (64, 16)) == 3, shapes
