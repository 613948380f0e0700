"""qlora_ext::decode_attention: one query token's attention over the filled slots of a static KV
cache with grouped K/V heads, against the fp32 reference (qlora_ext.reference.decode_attention)
under FlashAttention's rule (at most 2x the error of PyTorch's SDPA on the same 16-bit inputs), on
every device present; masks (none, bool, additive, one row for the batch); slots past the length
never read; CUDA graph replay; opcheck; bad input; and its use in the fused attention's decode
step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qlora_ext
from qlora_ext import block_ops, reference

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")

HAS_CUDA = torch.cuda.is_available() and qlora_ext.build_info()["with_cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU"))]
OPS = torch.ops.qlora_ext


@pytest.fixture(autouse=True)
def cuda_kernels_on():
    """The CUDA kernels are off by default (slower than cuDNN's SDPA in decoding): test them."""
    if not HAS_CUDA:
        yield
        return
    before = block_ops.decode_attention_kernel()
    block_ops.set_decode_attention_kernel(True)
    try:
        yield
    finally:
        block_ops.set_decode_attention_kernel(before)


def test_kernel_switch():
    if not HAS_CUDA:
        assert not block_ops.decode_attention_kernel()
        if not qlora_ext.build_info()["with_cuda"]:
            with pytest.raises(ValueError, match="no CUDA kernels"):
                block_ops.set_decode_attention_kernel(True)
        return
    assert block_ops.decode_attention_kernel()  # (the fixture)
    block_ops.set_decode_attention_kernel(False)
    assert not block_ops.decode_attention_kernel()


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def case(device, dtype, B, Hq, Hk, D, L, filled, mask_kind="none", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, Hq, D, generator=gen).to(device, dtype).transpose(1, 2)  # [B, Hq, 1, D] view, as decoding has it
    keys = torch.randn(B, Hk, L, D, generator=gen).to(device, dtype)
    values = torch.randn(B, Hk, L, D, generator=gen).to(device, dtype)
    length = torch.tensor(filled, dtype=torch.int64, device=device)
    mask = None
    if mask_kind != "none":
        allowed = torch.rand(B, 1, 1, L + 3, generator=gen) > 0.3
        allowed[..., max(filled - 1, 0)] = True  # the newest slot, as a causal decode mask has it
        if mask_kind == "bool":
            mask = allowed
        elif mask_kind == "broadcast":
            mask = allowed[:1]
        else:  # additive, with a bias on the allowed slots too
            bias = torch.randn(B, 1, 1, L + 3, generator=gen) * 0.5
            mask = torch.where(allowed, bias, torch.tensor(float("-inf")))
            mask = mask.to(torch.float32 if mask_kind == "additive_fp32" else dtype)
        mask = mask.to(device)
    return q, keys, values, length, mask, D**-0.5


def sdpa_baseline(q, keys, values, length, mask, scale):
    """PyTorch's SDPA on the same inputs, in their dtype: the yardstick of the rule."""
    filled = int(length)
    G = q.shape[1] // keys.shape[1]
    k = keys[:, :, :filled].repeat_interleave(G, dim=1)
    v = values[:, :, :filled].repeat_interleave(G, dim=1)
    m = None if mask is None else mask[..., :filled]
    if m is not None and m.dtype != torch.bool:
        m = m.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale).transpose(1, 2)


SHAPES = [  # (B, Hq, Hk, D, L, filled)
    (1, 32, 8, 128, 544, 300),  # Llama-3-8B mid-generation
    (2, 8, 2, 64, 40, 40),  # a full cache
    (1, 4, 4, 128, 7, 1),  # G = 1, the first slot
    (2, 16, 1, 64, 100, 63),  # G = 16
    (1, 8, 2, 256, 33, 33),
    (1, 6, 2, 96, 20, 10),  # D outside the CUDA kernels: ATen there
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "bool", "broadcast", "additive", "additive_fp32"])
def test_matches_reference(device, dtype, shape, mask_kind):
    args = case(device, dtype, *shape, mask_kind=mask_kind)
    out = block_ops.decode_attention(*args)
    B, Hq, _, D = args[0].shape
    assert out.shape == (B, 1, Hq, D) and out.dtype == dtype and out.is_contiguous()
    ref = reference.decode_attention(*args)
    err = (out.float() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), err
    else:
        base = (sdpa_baseline(*args).float() - ref).abs().max().item()
        assert err <= 2 * base + torch.finfo(dtype).eps, (err, base)


@pytest.mark.parametrize("device", DEVICES)
def test_slots_past_the_length_are_never_read(device):
    q, keys, values, length, mask, scale = case(device, torch.bfloat16, 2, 8, 2, 128, 64, 20, "bool")
    clean = block_ops.decode_attention(q, keys, values, length, mask, scale)
    keys[:, :, 20:] = float("nan")
    values[:, :, 20:] = float("inf")
    mask[..., 20:] = True  # even where the mask would allow them
    assert torch.equal(block_ops.decode_attention(q, keys, values, length, mask, scale), clean)


@pytest.mark.parametrize("device", DEVICES)
def test_a_row_with_nothing_allowed_is_zero(device):
    q, keys, values, length, mask, scale = case(device, torch.bfloat16, 2, 4, 2, 64, 16, 9, "bool")
    mask[1] = False
    out = block_ops.decode_attention(q, keys, values, length, mask, scale)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0
    empty = block_ops.decode_attention(q, keys, values, torch.zeros_like(length), None, scale)
    assert torch.equal(empty, torch.zeros_like(empty))
    # a cache of no slots, no batch rows
    for B, L in [(2, 0), (0, 16)]:
        q, keys, values, length, _, scale = case(device, torch.bfloat16, B, 4, 2, 64, L, 0)
        out = block_ops.decode_attention(q, keys, values, length, None, scale)
        assert out.shape == (B, 1, 4, 64) and not out.any()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
def test_cuda_graph_replays_with_the_length_on_the_device():
    q, keys, values, length, mask, scale = case("cuda", torch.bfloat16, 1, 32, 8, 128, 96, 10, "additive")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        OPS.decode_attention(q, keys, values, length, mask, scale)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OPS.decode_attention(q, keys, values, length, mask, scale)
    for filled in (10, 11, 57, 96):
        length.fill_(filled)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, OPS.decode_attention(q, keys, values, length, mask, scale)), filled


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
def test_cuda_kernel_against_the_aten_path():
    # The same inputs with the kernels switched off take ATen ops on CUDA: within bf16 rounding.
    args = case("cuda", torch.bfloat16, 1, 32, 8, 128, 544, 321, "additive")
    kernel = OPS.decode_attention(*args).float()
    block_ops.set_decode_attention_kernel(False)
    aten = OPS.decode_attention(*args).float()
    torch.testing.assert_close(kernel, aten, rtol=2**-7, atol=2**-7 * aten.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype, shape, mask_kind in [
        (torch.float32, (2, 4, 2, 64, 12, 7), "bool"),
        (torch.bfloat16, (1, 8, 2, 128, 40, 33), "additive"),
        (torch.float16, (2, 4, 1, 64, 9, 9), "none"),
    ]:
        torch.library.opcheck(OPS.decode_attention.default, case(device, dtype, *shape, mask_kind=mask_kind))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    q, keys, values, length, mask, scale = case(device, torch.bfloat16, 1, 8, 2, 64, 16, 5, "bool")

    def call(**changes):
        args = dict(q=q, key_cache=keys, value_cache=values, length=length, mask=mask, scale=scale) | changes
        return OPS.decode_attention(*args.values())

    with pytest.raises(RuntimeError, match="q must be \\[B, Hq, 1, D\\]"):
        call(q=torch.cat([q, q], dim=2))
    with pytest.raises(RuntimeError, match="key_cache must be \\[B, Hk, L, D\\]"):
        call(key_cache=keys[..., :32])
    with pytest.raises(RuntimeError, match="value_cache must have key_cache's shape"):
        call(value_cache=values[:, :, :8])
    with pytest.raises(RuntimeError, match="key_cache must have q's dtype"):
        call(key_cache=keys.float())
    with pytest.raises(RuntimeError, match="must be a multiple of the caches' Hk"):
        call(key_cache=torch.cat([keys, keys[:, :1]], dim=1), value_cache=torch.cat([values, values[:, :1]], dim=1))
    with pytest.raises(RuntimeError, match="length must be"):
        call(length=length.float())
    with pytest.raises(RuntimeError, match="length must hold one int64"):
        call(length=torch.zeros(2, dtype=torch.int64, device=device))
    with pytest.raises(RuntimeError, match="mask must be \\[B or 1, 1, 1, Lm\\] with Lm >= L"):
        call(mask=mask[..., :10])
    with pytest.raises(RuntimeError, match="mask must be bool, q's dtype"):
        call(mask=mask.to(torch.int32))
    with pytest.raises(RuntimeError, match="scale must be finite"):
        call(scale=float("nan"))
    with pytest.raises(RuntimeError, match="decode_attention has no autograd"):
        block_ops.decode_attention(q.detach().requires_grad_(True), keys, values, length, mask, scale)


# ---- the wiring: the fused attention's decode step over a StaticCache ---------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_attention_decodes_through_it(device, arch, monkeypatch):
    """Decode steps of a model with the fused block ops (the cache written by rope_append_kv_):
    the attention runs decode_attention, once per layer and step, and the logits stay within bf16
    noise of SDPA's over the whole cache with the mask."""
    transformers = pytest.importorskip("transformers")
    from train_helpers import VOCAB, hf_config

    from qlora_ext import fused_blocks
    from qlora_ext.generation import _HFDecoder

    config = hf_config(arch)
    config.head_dim = 64  # a head size the CUDA kernels take (the test config's own is 16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device).eval()
    assert model.model.layers[0].self_attn.head_dim == 64
    qlora_ext.disable_fused_block_ops(model)
    assert qlora_ext.enable_fused_block_ops(model, devices=(device,)) > 0
    calls = []
    real = block_ops.decode_attention
    monkeypatch.setattr(block_ops, "decode_attention", lambda *a: calls.append(1) or real(*a))
    prompt = torch.randint(0, VOCAB, (2, 5), device=device)

    def decode(enabled):
        monkeypatch.setattr(fused_blocks, "DECODE_ATTENTION_ENABLED", enabled)
        calls.clear()
        decoder = _HFDecoder(model, batch=2, max_len=9, device=torch.device(device))
        slot_mask = torch.ones(2, 9, dtype=torch.bool, device=device)
        slot_mask[1, :2] = False  # row 1 left-padded by two
        logits = []
        with torch.no_grad():
            for step, tokens in enumerate([prompt, prompt[:, :1], prompt[:, 1:2], prompt[:, 2:3]]):
                start = 0 if step == 0 else 4 + step
                positions = torch.arange(start, start + tokens.shape[1], device=device)
                logits.append(decoder.forward(tokens, positions.expand(2, -1), positions, slot_mask).float())
        return logits, len(calls)

    fused, fused_calls = decode(True)
    plain, plain_calls = decode(False)
    assert plain_calls == 0 and fused_calls == 3 * model.config.num_hidden_layers  # decode steps only
    for step, (a, b) in enumerate(zip(fused, plain)):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item(), msg=f"step {step}")
