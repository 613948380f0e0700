"""The fused training path that prepare() wires in by default (fused LM-head loss, fused MLP,
one-node checkpointing, and whatever else prepare fuses) against the generic path (every fusion
off, transformers' own modules and loss) on a tiny Llama, over 20 training steps."""

from __future__ import annotations

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


def _model(fused: bool, device, dtype):
    model = hf_model("llama", dtype=dtype)
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
    fused = _model(True, device, torch.bfloat16)
    generic = _model(False, device, torch.bfloat16)
    reference = _model(False, device, torch.float32)
    opt = torch.optim.AdamW(_trainable(fused).values(), lr=1e-2)
    worst = 0.0
    for step in range(STEPS):
        ids = token_batch(batch=2, seq=16, seed=step).to(device)
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
