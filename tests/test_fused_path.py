"""The fused training path that prepare() wires in by default (fused LM-head loss, fused MLP,
one-node checkpointing, and whatever else prepare fuses) against the generic path (every fusion
off, transformers' own modules and loss) on a tiny Llama, over 20 training steps."""

from __future__ import annotations

import contextlib
import functools
import inspect

import pytest
import torch
from train_helpers import devices, hf_model, randomize_adapters, token_batch

import qlora_ext

STEPS = 20


def _generic_options() -> dict:
    """Every fusion switch of prepare() turned off (any `fused_*` option, present or future)."""
    params = inspect.signature(qlora_ext.prepare).parameters
    return {name: False for name in params if name.startswith("fused")}


def _model(fused: bool, device, dtype, **config_changes):
    """The tiny Llama, prepared fused or generic; `config_changes` override its config."""
    model = hf_model("llama", dtype=dtype, **config_changes)
    torch.manual_seed(3)
    qlora_ext.prepare(model, r=4, alpha=8, verbose=False, **({} if fused else _generic_options()))
    randomize_adapters(model, seed=2)
    return model.to(device).train()


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _grads_at(model, params: dict, ids):
    """Loss and adapter gradients of `model` with its adapters set to `params`."""
    with torch.no_grad():
        for name, p in _trainable(model).items():
            p.copy_(params[name])
            p.grad = None
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in _trainable(model).items()}


@pytest.mark.parametrize("device", devices)
def test_fused_path_trains_like_the_generic_path_fp32(device):
    """At each of 20 points along a training run, with the same adapter values (separate runs
    drift apart: Adam amplifies round-off in near-zero gradients), loss and every LoRA gradient
    agree to fp32 round-off."""
    assert _generic_options(), "prepare() has no fused_* switches to compare"
    fused, generic = _model(True, device, torch.float32), _model(False, device, torch.float32)
    opt = torch.optim.AdamW(_trainable(fused).values(), lr=1e-2)
    for step in range(STEPS):
        ids = token_batch(batch=2, seq=16, seed=step).to(device)
        params = {n: p.detach().clone() for n, p in _trainable(fused).items()}
        ref_loss, ref_grads = _grads_at(generic, params, ids)
        loss, grads = _grads_at(fused, params, ids)
        torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-5, msg=f"step {step}")
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("device", devices)
def test_fused_path_bf16_error_within_twice_the_generic_paths(device):
    """At each of 20 points along a training run, with the same adapter values: the fused bf16
    model's loss and gradients err (against the generic path in fp32) at most twice as much as
    the generic path in bf16 does — FlashAttention's rule."""
    _check_bf16_within_twice_the_generic_paths(_model, device, STEPS, seq=16)


def _check_bf16_within_twice_the_generic_paths(make_model, device, steps: int, seq: int):
    fused = make_model(True, device, torch.bfloat16)
    generic = make_model(False, device, torch.bfloat16)
    reference = make_model(False, device, torch.float32)
    opt = torch.optim.AdamW(_trainable(fused).values(), lr=1e-2)
    worst = 0.0
    for step in range(steps):
        ids = token_batch(batch=2, seq=seq, seed=step).to(device)
        params = {n: p.detach().clone() for n, p in _trainable(fused).items()}
        ref_loss, ref_grads = _grads_at(reference, params, ids)
        gen_loss, gen_grads = _grads_at(generic, params, ids)
        loss, grads = _grads_at(fused, params, ids)
        assert abs(loss - ref_loss) <= 2 * abs(gen_loss - ref_loss) + 1e-3, step
        for name in ref_grads:
            scale = ref_grads[name].abs().max() + 1e-12
            err = float((grads[name] - ref_grads[name]).abs().max() / scale)
            base = float((gen_grads[name] - ref_grads[name]).abs().max() / scale)
            worst = max(worst, err / max(base, 1e-3))
            assert err <= 2 * base + 1e-3, (step, name, err, base)
        opt.step()  # move along the fused model's own trajectory
        opt.zero_grad(set_to_none=True)
    assert worst > 0  # the comparison saw real differences, not identical paths


# Heads 64 wide: every SDPA backend takes them (16, the default tiny model's, is under cuDNN's).
_model_head_dim_64 = functools.partial(_model, hidden_size=256, head_dim=64, intermediate_size=256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("first", ["CUDNN_ATTENTION", "FLASH_ATTENTION"])
def test_sdpa_priority_trains_within_the_rule_and_runs_its_backend(first, monkeypatch):
    """fused_blocks.SDPA_PRIORITY: with cuDNN's or flash attention tried first, the fused bf16 path
    keeps FlashAttention's rule against the generic path, and that backend's kernels are the ones
    that run (forward and backward)."""
    from torch.nn.attention import SDPBackend
    from torch.profiler import ProfilerActivity, profile

    from qlora_ext import fused_blocks

    monkeypatch.setattr(fused_blocks, "SDPA_PRIORITY", fused_blocks.sdpa_order(getattr(SDPBackend, first)))
    _check_bf16_within_twice_the_generic_paths(_model_head_dim_64, "cuda", steps=5, seq=64)

    model = _model_head_dim_64(True, "cuda", torch.bfloat16)
    ids = token_batch(batch=2, seq=64, seed=9).cuda()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
    names = [e.name.lower() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    cudnn = [n for n in names if "cudnn" in n]
    if first == "CUDNN_ATTENTION":
        assert len(cudnn) >= 2, names  # a forward and a backward kernel at least
    else:
        assert not cudnn and any("flash" in n for n in names), names


@pytest.mark.parametrize("first,records", [(None, True), ("CUDNN_ATTENTION", True), ("FLASH_ATTENTION", False),
                                           ("EFFICIENT_ATTENTION", False)])
def test_sdpa_priority_decides_whether_the_attention_replay_records(first, records, monkeypatch):
    """The attention replay keeps cuDNN's attention (_KeptAttention), so a layer records it only where
    SDPA_PRIORITY leaves cuDNN first; otherwise the recomputation runs SDPA in the asked order (on the
    H100 the flash-first case ran cuDNN's kernels before this, through the replay)."""
    from torch.nn.attention import SDPBackend

    from qlora_ext import attention_replay, fused_blocks

    seen = []
    real = attention_replay.attention_call

    def spy(*args, record=True, **kwargs):
        seen.append(record)
        return real(*args, record=record, **kwargs)

    monkeypatch.setattr(attention_replay, "attention_call", spy)
    if first is not None:
        monkeypatch.setattr(fused_blocks, "SDPA_PRIORITY", fused_blocks.sdpa_order(getattr(SDPBackend, first)))
    model = _model(True, "cpu", torch.float32)
    ids = token_batch(batch=2, seq=16, seed=4)
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen and all(r == records for r in seen), seen


def test_attention_call_without_record_keeps_nothing_but_consumes_a_replay(monkeypatch):
    from qlora_ext import attention_replay

    q = k = v = torch.randn(1, 2, 8, 4)
    monkeypatch.setattr(attention_replay, "_recording", lambda: object())  # a layer is recording
    monkeypatch.setattr(attention_replay, "kernel_applies", lambda *a: True)
    assert attention_replay.attention_call(q, k, v, 0.5, None, 0.0, {}, record=False) is None
    kept = []
    monkeypatch.setattr(attention_replay._KeptAttention, "apply", lambda *a: kept.append(a[-1]) or "replayed")
    attention_replay._state.replaying = "the first forward's"
    try:
        assert attention_replay.attention_call(q, k, v, 0.5, None, 0.0, {}, record=False) == "replayed"
    finally:
        attention_replay._state.replaying = None
    assert kept == ["the first forward's"]


def test_sdpa_priority_is_a_no_op_off_cuda(monkeypatch):
    """On the CPU the switch changes nothing: the same loss bits with and without it."""
    from torch.nn.attention import SDPBackend

    from qlora_ext import fused_blocks

    model = _model(True, "cpu", torch.float32)
    ids = token_batch(batch=2, seq=16, seed=4)
    before = model(input_ids=ids, labels=ids).loss
    monkeypatch.setattr(fused_blocks, "SDPA_PRIORITY", fused_blocks.sdpa_order(SDPBackend.CUDNN_ATTENTION))
    after = model(input_ids=ids, labels=ids).loss
    assert torch.equal(before, after)
    assert isinstance(fused_blocks._sdpa_priority(model.model.layers[0].self_attn, ids.float()), contextlib.nullcontext)


def test_sdpa_order_names_a_bad_backend():
    from torch.nn.attention import SDPBackend

    from qlora_ext import fused_blocks

    assert fused_blocks.sdpa_order(SDPBackend.FLASH_ATTENTION)[0] == SDPBackend.FLASH_ATTENTION
    assert len(set(fused_blocks.sdpa_order(SDPBackend.MATH))) == 4
    with pytest.raises(ValueError, match="first must be one of"):
        fused_blocks.sdpa_order("cudnn")
