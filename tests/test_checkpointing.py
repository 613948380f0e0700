"""Per-layer checkpointing (qlora_ext.checkpointing): same loss and gradients as no checkpointing,
layers really recomputed, little saved, RNG and autocast replayed."""

from __future__ import annotations

import pytest
import torch
from train_helpers import CountDoRANorms, hf_model, randomize_adapters, record_parks, token_batch

import qlora_ext
from qlora_ext import checkpointing
from qlora_ext.prepare import enable_gradient_checkpointing


def _model(arch="llama", dropout=0.0, checkpoint=True, method="lora"):
    model = hf_model(arch)
    torch.manual_seed(3)
    qlora_ext.prepare(model, r=4, alpha=8, dropout=dropout, gradient_checkpointing=checkpoint, verbose=False,
                      method=method)  # fmt: skip
    randomize_adapters(model)
    return model.train()


def _step(model, seed=11, autocast=False):
    ids = token_batch()
    torch.manual_seed(seed)  # the same dropout masks for every model of a comparison
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_same_loss_and_gradients_as_without_checkpointing(arch, dropout):
    checked, plain = _model(arch, dropout, True), _model(arch, dropout, False)
    assert checkpointing.is_enabled(checked) and not checkpointing.is_enabled(plain)
    loss, grads = _step(checked)
    ref_loss, ref_grads = _step(plain)
    # Dropout masks must be replayed exactly in the recomputation, or the gradients differ.
    assert torch.equal(loss, ref_loss)
    assert all(g is not None for g in grads)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


def test_autocast_is_replayed_in_the_recomputation():
    loss, grads = _step(_model(), autocast=True)
    ref_loss, ref_grads = _step(_model(checkpoint=False), autocast=True)
    assert torch.equal(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


def test_layers_are_recomputed_and_only_their_inputs_saved():
    def saved_bytes_and_calls(model):
        layers = model.model.layers
        calls = {"n": 0}
        hooks = [layer.mlp.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1)) for layer in layers]
        saved = []
        ids = token_batch()
        # Only the forward's saves stay alive until backward (the recomputation saves one layer's).
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for h in hooks:
            h.remove()
        return sum(saved), calls["n"]

    checked_bytes, checked_calls = saved_bytes_and_calls(_model())
    plain_bytes, plain_calls = saved_bytes_and_calls(_model(checkpoint=False))
    n_layers = 2
    assert plain_calls == n_layers and checked_calls == 2 * n_layers  # forward + recomputation
    assert checked_bytes < plain_bytes / 2


def test_no_grad_runs_the_layer_plainly():
    model = _model()
    ids = token_batch()
    with torch.no_grad():
        out = model(input_ids=ids)
    assert out.logits is not None and not out.logits.requires_grad


def test_plain_modules_keep_their_own_checkpointing():
    assert not checkpointing.enable(torch.nn.Linear(2, 2))
    model = hf_model("llama")
    assert enable_gradient_checkpointing(model) and checkpointing.is_enabled(model)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_under_checkpointing_has_the_same_gradients(dropout):
    checked, plain = _model(dropout=dropout, method="dora"), _model(dropout=dropout, checkpoint=False, method="dora")
    for step in range(2):
        loss, grads = _step(checked, seed=step)
        ref_loss, ref_grads = _step(plain, seed=step)
        assert torch.equal(loss, ref_loss)
        for g, r in zip(grads, ref_grads):
            assert torch.equal(g, r)
        for model in (checked, plain):  # a parameter update between steps
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(p.grad, alpha=-0.1)
                        p.grad = None


@pytest.mark.parametrize("fused_mlp", [True, False])
def test_dora_recomputation_reuses_the_weight_norms(fused_mlp, monkeypatch):
    # The norm depends only on the parameters: each projection computes it once per step, in the
    # first forward, and the recomputation reuses it (same gradients: the test above).
    norms = CountDoRANorms(monkeypatch)
    model = hf_model("llama")
    qlora_ext.prepare(model, r=4, alpha=8, method="dora", verbose=False, fused_mlp=fused_mlp)
    model.train()
    for step in range(2):
        norms.n = 0
        _step(model, seed=step)
        assert norms.n == 7 * 2  # 7 projections in each of the 2 layers, once


def test_remembered_values_reach_only_their_own_recomputation_and_die_with_the_graph():
    import gc
    import weakref

    seen, made = [], []

    class Layer(torch.nn.Module):
        def forward(self, x):
            seen.append((checkpointing.phase()[0], checkpointing.replayed("k")))
            value = torch.full((1,), float(len(seen)))
            made.append(weakref.ref(value))
            checkpointing.remember("k", value)
            return x * 2

    layer = Layer()
    x = torch.ones(3, requires_grad=True)
    assert checkpointing.replayed("k") is None  # outside checkpointing: nothing
    y1 = checkpointing.checkpoint(layer, x)
    y2 = checkpointing.checkpoint(layer, x)
    y2.sum().backward()  # the second call's recomputation gets the second call's value
    assert [phase for phase, _ in seen] == ["forward", "forward", "recompute"]
    assert seen[0][1] is None and seen[1][1] is None and float(seen[2][1]) == 2.0
    seen.clear()
    gc.collect()
    assert made[0]() is not None  # y1's backward never ran: its node still holds the value
    del y1, y2
    gc.collect()
    assert all(ref() is None for ref in made)  # nothing outside the graphs kept any of them


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("offload", [False, True])
def test_remembered_tensors_travel_with_the_layer_input_where_it_is_offloaded(device, offload, monkeypatch):
    """remember(offload=True): in a layer that offloads its input, a CUDA tensor goes to pinned
    host memory too (parked beside the input, outside the chain of layer inputs) and comes back,
    the same values, when replayed; elsewhere (CPU, or a layer that keeps its input) it is kept
    as is, the very tensor."""
    parks = record_parks(monkeypatch)
    made, seen = [], []

    class Layer(torch.nn.Module):
        def forward(self, x):
            if checkpointing.first_forward():
                value = torch.arange(6.0, device=x.device).reshape(2, 3) + len(made)
                made.append(value)
                checkpointing.remember("z", value, offload=True)
            else:
                seen.append(checkpointing.replayed("z"))
            return x * 2

    x = torch.ones(4, 8, device=device, requires_grad=True)
    ys = [checkpointing.checkpoint(Layer(), x * (i + 1), offload=offload) for i in range(2)]
    sum(y.sum() for y in ys).backward()
    offloaded = offload and device == "cuda"
    # the two layer inputs (chained) and, beside each, its remembered tensor (not chained)
    assert parks == ([True, False, True, False] if offloaded else [])
    assert [float(t[0, 0]) for t in seen] == [1.0, 0.0]  # backward runs the second layer first
    for got, want in zip(seen, made[::-1]):
        assert got.device == want.device and torch.equal(got, want)
        assert (got is want) != offloaded
    assert torch.equal(x.grad, torch.full_like(x, 6.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_remembered_tuple_is_offloaded_on_cuda_in_one_buffer_and_comes_back_whole(monkeypatch):
    """remember(tuple, offload=True): its CUDA tensors (any dtypes and shapes) share one pinned
    buffer and come back by one fetch as views of one device buffer, the same values; a CPU
    tensor and a non-tensor stay as they are; one that requires grad parks alone and comes back
    requiring grad."""
    parks = record_parks(monkeypatch)
    fetches = []
    fetch = checkpointing._offloader.fetch
    monkeypatch.setattr(checkpointing._offloader, "fetch", lambda parked: fetches.append(parked) or fetch(parked))
    seen = []
    gen = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    kept = (torch.randn(5, 7, device="cuda", generator=gen).to(torch.bfloat16),
            torch.randn(3, device="cuda", generator=gen),
            torch.randint(0, 100, (2, 2, 3), device="cuda", generator=gen, dtype=torch.int64),
            torch.ones(2), "tag",
            torch.randn(4, device="cuda", generator=gen).requires_grad_())  # fmt: skip
    copies = [t.clone() if isinstance(t, torch.Tensor) else t for t in kept]

    def layer(x):
        if checkpointing.first_forward():
            checkpointing.remember("t", kept, offload=True)
        else:
            seen.append(checkpointing.replayed("t"))
        return x * 2

    x = torch.ones(4, 8, device="cuda", requires_grad=True)
    checkpointing.checkpoint(layer, x, offload=True).sum().backward()
    assert parks == [True, False, ("together", 3)]
    (got,) = seen
    assert len(got) == len(kept) and got[4] == "tag" and got[3] is kept[3]
    for g, want in zip(got[:3] + got[5:], copies[:3] + copies[5:]):
        assert g.device == want.device and g.dtype == want.dtype and g.shape == want.shape
        assert torch.equal(g, want)
    assert got[0].untyped_storage().data_ptr() == got[2].untyped_storage().data_ptr()  # one buffer
    assert got[5].requires_grad and not got[0].requires_grad
    assert len(fetches) == 3  # the layer input, the lone tensor, the group (once)


# ---- offloading the saved layer inputs to pinned host memory ------------------------------------

def _offloaded_model(device, dropout=0.0, offload=True):
    model = hf_model("llama")
    torch.manual_seed(3)
    qlora_ext.prepare(model, r=4, alpha=8, dropout=dropout, verbose=False, offload_checkpoints=offload)
    randomize_adapters(model)
    return model.to(device).train()


def _step_on(model, device, ids, seed=11):
    torch.manual_seed(seed)
    loss = model(input_ids=ids.to(device), labels=ids.to(device)).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_offload_option_is_wired_and_checked():
    model = _offloaded_model("cpu")
    assert checkpointing.is_enabled(model, offload=True) and not checkpointing.is_enabled(model, offload=False)
    with pytest.raises(ValueError, match="needs gradient_checkpointing=True"):
        qlora_ext.prepare(hf_model("llama"), gradient_checkpointing=False, offload_checkpoints=True, verbose=False)
    with pytest.raises(ValueError, match="offload_checkpoints needs a transformers model"):
        qlora_ext.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8)), offload_checkpoints=True, verbose=False)


def test_offload_is_the_default_where_it_applies():
    # None (the default): transformers models offload; models without per-layer hooks, or without
    # checkpointing, are prepared as before instead of failing.
    assert checkpointing.is_enabled(_offloaded_model("cpu", offload=None), offload=True)
    resident = _offloaded_model("cpu", offload=False)
    assert checkpointing.is_enabled(resident, offload=False) and not checkpointing.is_enabled(resident, offload=True)
    assert not checkpointing.is_enabled(
        qlora_ext.prepare(hf_model("llama"), gradient_checkpointing=False, verbose=False), offload=None)
    qlora_ext.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8)), target_modules=["0"], verbose=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offloaded_checkpoints_give_the_same_gradients(device, dropout):
    """Bit for bit, over two micro-batches (the second forward runs after the first backward) and
    with two forwards before their backwards (prefetch must not fetch the wrong layer)."""
    ids = token_batch(batch=2, seq=16)
    offloaded, kept = _offloaded_model(device, dropout), _offloaded_model(device, dropout, offload=False)
    for seed in (1, 2):
        loss, grads = _step_on(offloaded, device, ids, seed)
        ref_loss, ref_grads = _step_on(kept, device, ids, seed)
        assert torch.equal(loss, ref_loss)
        for g, r in zip(grads, ref_grads):
            assert torch.equal(g, r)
    for model in (offloaded, kept):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        losses = [model(input_ids=ids.to(device), labels=ids.to(device)).loss for _ in range(2)]
        sum(losses).backward()
    for p, q in zip(offloaded.parameters(), kept.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad)


@pytest.mark.not_under_sanitizer
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloading_frees_the_layer_inputs_on_the_device():
    ids = token_batch(batch=4, seq=64)
    held = {}
    for offload in (False, True):
        model = _offloaded_model("cuda", offload=offload)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids.cuda(), labels=ids.cuda()).loss
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # lets the allocator retire blocks whose side-stream copies are done
        held[offload] = torch.cuda.memory_allocated() - before
        loss.backward()
    n_layers, hidden = 2, 64
    layer_input_bytes = ids.numel() * hidden * 4
    assert held[False] - held[True] >= (n_layers - 0.5) * layer_input_bytes, held


class _AdapterCasts:
    """Casts of 2-D fp32 tensors (the adapters) to bf16 during a step, by checkpointing phase
    ("forward", "recompute", None for the backward and anything outside a layer)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.by_phase = {}
        counts = self.by_phase

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if (func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 and args[0].dim() == 2
                        and kwargs.get("dtype") == torch.bfloat16):  # fmt: skip
                    phase = checkpointing.phase()
                    key = None if phase is None else phase[0]
                    counts[key] = counts.get(key, 0) + 1
                return func(*args, **kwargs)

        self.mode = Mode


def _bf16_step(model, seed=11):
    # 2 x 48 tokens: on CUDA past the rows where a no-grad forward takes the NF4 GEMV/GEMM routes
    # (module by module) instead of the fused units, as at training sizes
    ids = token_batch(batch=2, seq=48).to(next(model.parameters()).device)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])  # fmt: skip
@pytest.mark.parametrize("fused", [True, False])
def test_recomputation_reuses_the_first_forwards_adapter_casts(fused, device, monkeypatch):
    """bf16 compute with fp32 adapters: each adapter is cast in the layer's first forward only; the
    recomputation reuses the casts (checkpointing.kept_cast) and the gradients are the same bits
    as casting again. `fused`: the fused Q/K/V and MLP units, else one module per projection."""

    def model():
        m = hf_model("llama", dtype=torch.bfloat16)
        torch.manual_seed(3)
        qlora_ext.prepare(m, r=4, alpha=8, gradient_checkpointing=True, verbose=False, fused_mlp=fused,
                          fused_qkv=fused)  # fmt: skip
        randomize_adapters(m)
        assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
        return m.to(device).train()

    casts = _AdapterCasts()
    with casts.mode():
        loss, grads = _bf16_step(model())
    assert casts.by_phase.get("forward", 0) >= 2 * 7  # two layers, seven projections
    assert casts.by_phase.get("recompute", 0) == 0

    # the reference casts every time (kept_constant made to keep nothing): the same bits
    monkeypatch.setattr(checkpointing, "kept_constant", lambda key, make, *operands: make())
    fresh = _AdapterCasts()
    with fresh.mode():
        ref_loss, ref_grads = _bf16_step(model())
    assert fresh.by_phase.get("recompute", 0) >= 2 * 7
    assert torch.equal(loss, ref_loss)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


def test_kept_constant_is_made_once_per_layer_and_anew_for_a_changed_operand():
    made = []
    weight = torch.ones(3)

    def make():
        made.append(1)
        return weight * 2

    def layer(x):
        first = checkpointing.kept_constant(("w", id(weight), weight._version), make, weight)
        again = checkpointing.kept_constant(("w", id(weight), weight._version), make, weight)
        assert (first is again) == (checkpointing.phase() is not None)  # kept within a checkpointed layer only
        return x * first.sum()

    x = torch.ones(2, requires_grad=True)
    checkpointing.checkpoint(layer, x).sum().backward()
    assert len(made) == 1  # the first forward's, reused by the recomputation
    assert torch.equal(x.grad, torch.full((2,), 6.0))
    made.clear()
    layer(torch.ones(2))  # outside a checkpointed layer: made on every call
    assert len(made) == 2
    made.clear()
    out = checkpointing.checkpoint(layer, x)
    with torch.no_grad():
        weight.add_(1)  # a new version: the recomputation makes its own
    out.sum().backward()
    assert len(made) == 2
    # grad mode with an operand that requires grad: never kept (a graph must go through it)
    made.clear()
    w = torch.ones(3, requires_grad=True)

    def layer_with_trainable(x):
        return x * checkpointing.kept_constant(("g", id(w)), lambda: made.append(1) or w * 2, w).sum()

    checkpointing.checkpoint(layer_with_trainable, x).sum().backward()
    assert len(made) == 2 and torch.equal(w.grad, torch.full((3,), 4.0))
