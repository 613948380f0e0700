"""Cross-entropy fused with the LM head (fused_loss.py): against F.cross_entropy of F.linear, and
wired into prepared transformers models against their own loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from train_helpers import hf_model, randomize_adapters, token_batch

import qlora_ext
from qlora_ext.fused_loss import (
    causal_lm_loss,
    disable_fused_loss,
    enable_fused_loss,
    linear_cross_entropy,
    supports_fused_loss,
)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def _plain(h, w, y, b=None, ignore_index=-100, num_items=None):
    logits = F.linear(h, w, b).float()  # the plain path: logits in the model dtype, loss in fp32
    if num_items is None:
        return F.cross_entropy(logits.reshape(-1, w.shape[0]), y.reshape(-1), ignore_index=ignore_index)
    total = F.cross_entropy(logits.reshape(-1, w.shape[0]), y.reshape(-1), ignore_index=ignore_index, reduction="sum")
    return total / num_items


def _inputs(device, dtype, shape=(3, 37), hidden=24, vocab=101, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).to(device, dtype).requires_grad_() if bias else None
    y = torch.randint(0, vocab, shape, generator=g)
    y[torch.rand(shape, generator=g) < 0.3] = -100  # ignored tokens (prompt, padding)
    return h, w, b, y.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_cross_entropy_of_linear(device, dtype, chunk, bias):
    h, w, b, y = _inputs(device, dtype, bias=bias)
    loss = linear_cross_entropy(h, w, y, b, chunk=chunk)
    grads = torch.autograd.grad(loss * 3.0, [t for t in (h, w, b) if t is not None])
    expected = _plain(h, w, y, b)
    expected_grads = torch.autograd.grad(expected * 3.0, [t for t in (h, w, b) if t is not None])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, **TOL[dtype])
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_frozen_head_gets_no_gradient_and_num_items_divides_the_sum(device):
    h, w, _, y = _inputs(device, torch.float32)
    w.requires_grad_(False)
    loss = linear_cross_entropy(h, w, y, num_items=50)
    torch.testing.assert_close(loss, _plain(h, w, y, num_items=50))
    loss.backward()
    assert w.grad is None and h.grad is not None
    (expected_h,) = torch.autograd.grad(_plain(h, w, y, num_items=50), [h])
    torch.testing.assert_close(h.grad, expected_h)


def test_all_ignored_gives_nan_as_cross_entropy(device):
    h, w, _, y = _inputs(device, torch.float32)
    y = torch.full_like(y, -100)
    assert torch.isnan(linear_cross_entropy(h, w, y)) and torch.isnan(_plain(h, w, y))


def test_causal_shift_matches_transformers_convention(device):
    h, w, _, y = _inputs(device, torch.float32, shape=(2, 9))
    loss = causal_lm_loss(h, w, y)
    expected = _plain(h[:, :-1], w, y[:, 1:])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(causal_lm_loss(h[:, :-1], w, None, shift_labels=y[:, 1:]), expected)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda h, w, y: linear_cross_entropy(h, w, y[:, 1:]), ValueError, "targets has shape"),
        (lambda h, w, y: linear_cross_entropy(h, w[:, 1:], y), ValueError, "weight must be"),
        (lambda h, w, y: linear_cross_entropy(h, w, y.float()), TypeError, "targets must be an integer"),
        (lambda h, w, y: linear_cross_entropy(h, w, y, chunk=0), ValueError, "chunk must be a positive int"),
        (lambda h, w, y: causal_lm_loss(h, w, y[:, 1:]), ValueError, "labels has shape"),
    ],
)
def test_bad_arguments_raise_naming_them(call, error, match):
    h, w, _, y = _inputs("cpu", torch.float32)
    with pytest.raises(error, match=match):
        call(h, w, y)


# ---- wired into prepared models -------------------------------------------------------------------


def _prepared(arch, fused, device, dtype=torch.float32):
    model = hf_model(arch, dtype=dtype).to(device)
    torch.manual_seed(3)
    qlora_ext.prepare(model, r=4, alpha=8, gradient_checkpointing=False, fused_loss=fused, verbose=False)
    randomize_adapters(model)
    return model.train()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_prepared_model_loss_and_adapter_grads_match_the_unfused_path(device, arch):
    fused, plain = _prepared(arch, True, device), _prepared(arch, False, device)
    assert getattr(fused, "_qlora_fused_loss", False) and not getattr(plain, "_qlora_fused_loss", False)
    ids = token_batch().to(device)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    out = fused(input_ids=ids, labels=labels)
    assert out.logits is None
    ref = plain(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_evaluation_and_generation_keep_the_models_own_forward():
    model = _prepared("llama", True, "cpu")
    ids = token_batch()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)  # evaluation: logits wanted
    assert out.logits is not None and out.loss is not None
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_deepcopy_rebinds_and_disable_restores():
    model = _prepared("llama", True, "cpu")
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone
    ids = token_batch()
    torch.testing.assert_close(clone(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)
    disable_fused_loss(model)
    assert model(input_ids=ids, labels=ids).logits is not None
    assert enable_fused_loss(model) and model(input_ids=ids, labels=ids).logits is None


def test_models_with_other_logit_heads_are_left_alone():
    model = hf_model("gpt2")
    assert not supports_fused_loss(model) and not enable_fused_loss(model)
    assert not supports_fused_loss(torch.nn.Linear(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_stays_below_the_full_logits():
    # 4096 tokens x 32000 vocab: fp32 logits alone are 524 MB (the unfused path holds them, their
    # bf16 copy and their gradient). Chunks of 512 tokens hold 1/8 of that a few times over.
    torch.cuda.empty_cache()
    h = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32000, 256, device="cuda", dtype=torch.bfloat16) / 16
    y = torch.randint(0, 32000, (4096,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(h, w, y, chunk=512).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 4096 * 32000 * 4 / 2, extra


@pytest.mark.not_under_sanitizer
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_chunk_holds_its_fp32_logits_and_one_model_dtype_copy_only():
    # The chunk's fp32 logits are exponentiated in place (no logsumexp workspace of the same size):
    # at most one fp32 [chunk, V] buffer and one bf16 one live at a time, plus dL/dh.
    torch.cuda.empty_cache()
    tokens, vocab, hidden, chunk = 2048, 32000, 256, 512
    h = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) / 16
    y = torch.randint(0, vocab, (tokens,), device="cuda")
    linear_cross_entropy(h[:1], w, y[:1]).backward()  # one-time allocations (cuBLAS' workspace) first
    h.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(h, w, y, chunk=chunk).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    allowed = chunk * vocab * (4 + 2) + 2 * h.numel() * h.element_size() + (4 << 20)
    assert extra <= allowed, (extra, allowed)
