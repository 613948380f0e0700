"""attention_replay: a checkpointed layer's attention half kept by its first forward and replayed
in its recomputation gives the gradients of the full recomputation, bit for bit, and skips the
attention's projections and kernel there."""

from __future__ import annotations

import collections

import pytest
import torch
from train_helpers import hf_model, randomize_adapters, record_parks, token_batch

import qlora_ext
from qlora_ext import _ops, attention_replay, block_ops, checkpointing

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _sdpa(q, k, v, scale):
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                           enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip
    return out.transpose(1, 2)


def _float_reference(q, k, v, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    return _sdpa(q.double(), k, v, scale)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_kept_attention_is_causal_attention_with_its_gradients(device, dtype, heads, tokens):
    """Against PyTorch's SDPA and an fp64 reference: output and q/k/v gradients, GQA included,
    odd lengths; error within 2x SDPA's own (plus an ulp of the dtype) where SDPA runs."""
    hq, hk = heads
    q = torch.randn(2, tokens, hq, 64, device=device, dtype=dtype).transpose(1, 2)  # projection layout
    k = torch.randn(2, tokens, hk, 64, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(2, tokens, hk, 64, device=device, dtype=dtype).transpose(1, 2)
    if not attention_replay.kernel_applies(q, k, v):
        # cuDNN: 16-bit only, and not one token over one; the layer recomputes instead
        assert device == "cuda" and (dtype == torch.float32 or tokens == 1)
        return
    for t in (q, k, v):
        t.requires_grad_(True)
    scale = 64**-0.5
    grad = torch.randn(2, tokens, hq, 64, device=device, dtype=dtype)
    out = attention_replay._KeptAttention.apply(q, k, v, scale, None)
    assert out.shape == (2, tokens, hq, 64) and out.is_contiguous() and out.dtype == dtype
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    ref = _float_reference(q, k, v, scale)
    want = (ref, *torch.autograd.grad(ref, (q, k, v), grad.double()))
    sdpa = _sdpa(q, k, v, scale)
    theirs = (sdpa, *torch.autograd.grad(sdpa, (q, k, v), grad))
    ulp = torch.finfo(dtype).eps
    for name, g, w, t in zip(("out", "dq", "dk", "dv"), got, want, theirs):
        assert g.shape == w.shape and g.dtype == dtype, name
        err, their_err = (g.double() - w).abs().max(), (t.double() - w).abs().max()
        assert err <= 2 * their_err + ulp * w.abs().max(), (name, float(err), float(their_err))


def _model(arch, method="lora", dtype=torch.float32, device="cpu"):
    """A tiny model prepared with checkpointing; with the fused block ops on the CPU too, so that
    every method's attention runs fused_blocks' forward there as it does on CUDA."""
    from qlora_ext import fused_blocks

    model = hf_model(arch, dtype=dtype)
    torch.manual_seed(3)
    qlora_ext.prepare(model, r=4, alpha=8, gradient_checkpointing=True, verbose=False, method=method)
    fused_blocks.disable_fused_block_ops(model)
    fused_blocks.enable_fused_block_ops(model, devices=("cpu", "cuda"))
    randomize_adapters(model)
    return model.to(device).train()


def _steps(model, device="cpu", steps=2, mask=None, seq=8):
    out = []
    for seed in range(steps):
        ids = token_batch(seq=seq, seed=seed).to(device)
        torch.manual_seed(11)
        loss = model(input_ids=ids, labels=ids, attention_mask=mask).loss
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        model.zero_grad(set_to_none=True)
    return out


class _Counts:
    """Calls of the attention kernel, replays, and base-weight dequantizations (NF4 weights
    dequantized, by checkpointing phase: "forward", "recompute", None for the backward)."""

    def __init__(self, monkeypatch):
        self.attend = self.replays = 0
        self.dequantized = collections.Counter()
        attend, forward = attention_replay._attend, attention_replay._KeptAttention.forward

        def count_attend(*args, **kwargs):
            self.attend += 1
            return attend(*args, **kwargs)

        def count_forward(ctx, q, k, v, scale, kept):
            self.replays += kept is not None
            return forward(ctx, q, k, v, scale, kept)

        def counting(op):
            def call(*args, **kwargs):
                phase = checkpointing.phase()
                self.dequantized[None if phase is None else phase[0]] += 1
                return op(*args, **kwargs)

            return call

        self.block_ops = collections.Counter()  # (op, phase): the RMSNorm/RoPE/SwiGLU kernels called
        differentiable = block_ops._differentiable

        def count_block_op(name, *args):
            phase = checkpointing.phase()
            self.block_ops[name, None if phase is None else phase[0]] += 1
            return differentiable(name, *args)

        monkeypatch.setattr(block_ops, "_differentiable", count_block_op)
        monkeypatch.setattr(attention_replay, "_attend", count_attend)
        monkeypatch.setattr(attention_replay._KeptAttention, "forward", staticmethod(count_forward))
        for name in ("nf4_dequantize", "nf4_dequantize_into"):
            monkeypatch.setattr(_ops, name, counting(getattr(_ops, name)))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])  # qwen3: q/k RMSNorm before RoPE
@pytest.mark.parametrize("method", ["lora", "dora", "lora_fa", "vera"])
def test_replay_gives_the_gradients_of_the_recomputation(arch, method, monkeypatch):
    # (LoRA-FA and VeRA take the per-module path: q/k/v and o compute in full, the attention and h replay)
    monkeypatch.setattr(attention_replay, "REPLAY", "never")
    reference = _steps(_model(arch, method))
    counts = _Counts(monkeypatch)
    monkeypatch.setattr(attention_replay, "REPLAY", "always")
    replayed = _steps(_model(arch, method))
    layers, steps = 2, 2
    assert counts.attend == layers * steps and counts.replays == layers * steps
    for (loss, grads), (ref_loss, ref_grads) in zip(replayed, reference):
        assert torch.equal(loss, ref_loss)
        assert len(grads) == len(ref_grads) and all(g is not None for g in grads)
        for g, r in zip(grads, ref_grads):
            assert torch.equal(g, r)


def test_recomputation_skips_the_attention_projections(monkeypatch):
    """The recomputation dequantizes none of q, k, v and o (their GEMMs are skipped with them);
    the first forward and the backward dequantize what they did (no layer checkpointed twice)."""
    seen = {}
    for mode in ("never", "always"):
        with monkeypatch.context() as patch:
            patch.setattr(attention_replay, "REPLAY", mode)
            seen[mode] = _Counts(patch)
            _steps(_model("llama"), steps=1)
    layers = 2
    never, always = seen["never"].dequantized, seen["always"].dequantized
    assert never["recompute"] - always["recompute"] == 4 * layers
    assert never["forward"] == always["forward"] == 7 * layers and never[None] == always[None]
    assert seen["never"].attend == 0 and seen["always"].attend == layers
    # nor rotate q and k (the rope's gradient only; the first forward rotated them in place)
    assert seen["never"].block_ops["rope", "recompute"] == layers and seen["always"].block_ops["rope", "recompute"] == 0


def test_offloaded_mode_keeps_nothing_without_a_gpu_to_offload_from(monkeypatch):
    """The default ("offloaded") replays only where the layer's input went to host memory: on the
    CPU nothing is kept beyond what checkpointing keeps."""
    assert attention_replay.REPLAY == "offloaded"
    counts = _Counts(monkeypatch)
    _steps(_model("llama"), steps=1)
    assert counts.attend == 0 and counts.replays == 0


def test_a_padding_mask_falls_back_to_the_recomputation(monkeypatch):
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding: attention with a mask, which _KeptAttention does not take
    monkeypatch.setattr(attention_replay, "REPLAY", "never")
    reference = _steps(_model("llama"), steps=1, mask=mask)
    counts = _Counts(monkeypatch)
    monkeypatch.setattr(attention_replay, "REPLAY", "always")
    replayed = _steps(_model("llama"), steps=1, mask=mask)
    assert counts.attend == 0 and counts.replays == 0
    for g, r in zip(replayed[0][1], reference[0][1]):
        assert torch.equal(g, r)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_offloaded_replay_on_cuda_gives_the_gradients_of_the_recomputation(dtype, monkeypatch):
    """prepare()'s defaults on CUDA (layer inputs offloaded, REPLAY "offloaded"): the attention half
    goes to host memory and back, prefetched, and the gradients equal those of the recomputation
    with the same attention kernel (SDPA's cuDNN backend first)."""
    from torch.nn.attention import SDPBackend

    from qlora_ext import fused_blocks

    monkeypatch.setattr(fused_blocks, "SDPA_PRIORITY", fused_blocks.sdpa_order(SDPBackend.CUDNN_ATTENTION))
    monkeypatch.setattr(attention_replay, "REPLAY", "never")
    # 2 x 48 tokens: past the rows where the NF4 GEMM routes take q/k/v apart, so the fused Q/K/V
    # unit makes them (one buffer), as it does at training sizes
    reference = _steps(_model("llama", dtype=dtype, device="cuda"), "cuda", seq=48)
    parks = record_parks(monkeypatch)
    counts = _Counts(monkeypatch)
    monkeypatch.setattr(attention_replay, "REPLAY", "offloaded")
    replayed = _steps(_model("llama", dtype=dtype, device="cuda"), "cuda", seq=48)
    layers, steps = 2, 2
    assert counts.attend == layers * steps and counts.replays == layers * steps
    # per layer: the input (chained), then h, the output and the one q/k/v buffer beside it, in one buffer
    assert parks.count(True) == layers * steps and parks.count(("together", 3)) == layers * steps
    assert len(parks) == 2 * layers * steps
    for (loss, grads), (ref_loss, ref_grads) in zip(replayed, reference):
        assert torch.equal(loss, ref_loss)
        for g, r in zip(grads, ref_grads):
            assert torch.equal(g, r)


def test_a_recomputation_that_misses_the_kept_attention_raises(monkeypatch):
    """If the attention's path changes between a forward and its backward (here: the fused block
    ops switched off), the skipped projections' outputs would reach the backward: an error, not
    wrong gradients."""
    from qlora_ext import fused_blocks, fused_qkv

    monkeypatch.setattr(attention_replay, "REPLAY", "always")
    model = _model("llama", method="vera")  # q/k/v and o as modules: the class forward calls them too
    ids = token_batch()
    loss = model(input_ids=ids, labels=ids).loss
    fused_blocks.disable_fused_block_ops(model)
    fused_qkv.disable_fused_qkv(model)
    for layer in model.model.layers:  # the decoder layers keep fused_blocks' forward (the replay's entry)
        layer.forward = fused_blocks._hf_decoder_layer_forward.__get__(layer)
    with pytest.raises(RuntimeError, match="did not reach the attention"):
        loss.backward()


def test_an_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setattr(attention_replay, "REPLAY", "sometimes")
    ids = token_batch()
    with pytest.raises(ValueError, match="REPLAY must be"):
        _model("llama")(input_ids=ids, labels=ids)
