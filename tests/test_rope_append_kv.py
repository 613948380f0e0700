"""qlora_ext::rope_append_kv_: one decode step's RoPE and KV-cache write (q rotated in place,
rope(k) and v written at the cache's filled length, the length advanced), against the reference
(qlora_ext.reference.rope_append_kv) and against what it replaces in transformers (rope_ then
StaticLayer.update), on every device present; the one-CTA and the many-CTA CUDA launches; opcheck;
bad input."""

from __future__ import annotations

import pytest
import torch

import qlora_ext
from qlora_ext import block_ops, reference
from test_block_ops import rope_tables

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")

HAS_CUDA = torch.cuda.is_available() and qlora_ext.build_info()["with_cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = torch.ops.qlora_ext


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def step_case(device, dtype, B, Hq, Hk, T, Dh, Dv, L, filled, *, cos_batch=1, table_dtype=None, layout="bthd"):
    """A decode step's operands: q, k, v as transformers' attention makes them (layout "bthd":
    transposed views of [B, T, H, D] projections), cos/sin, caches [B, Hk, L, D] with random
    contents (slots past `filled` must stay as they are too), and the filled length on the device."""
    def make(H, D):
        if layout == "bthd":
            return torch.randn(B, T, H, D).to(device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(B, H, T, D).to(device=device, dtype=dtype)

    cos, sin = rope_tables(cos_batch, T, Dh, table_dtype or dtype, device)
    key_cache = torch.randn(B, Hk, L, Dh).to(device=device, dtype=dtype)
    value_cache = torch.randn(B, Hk, L, Dv).to(device=device, dtype=dtype)
    length = torch.tensor(filled, dtype=torch.int64, device=device)
    return make(Hq, Dh), make(Hk, Dh), make(Hk, Dv), cos, sin, key_cache, value_cache, length


def run_and_reference(case):
    q, k, v, cos, sin, key_cache, value_cache, length = case
    q_ref, keys_ref, values_ref, length_ref = reference.rope_append_kv(q, k, v, cos, sin, key_cache, value_cache, length)
    block_ops.rope_append_kv_(q, k, v, cos, sin, key_cache, value_cache, length)
    return (q, key_cache, value_cache, length), (q_ref, keys_ref, values_ref, length_ref)


STEP_SHAPES = [  # (B, Hq, Hk, T, Dh, Dv, L, filled)
    (1, 32, 8, 1, 128, 128, 40, 17),  # Llama-3-8B decode (one CTA on CUDA)
    (2, 4, 2, 1, 64, 64, 9, 0),  # first slot
    (1, 4, 2, 3, 16, 16, 8, 5),  # the last slots
    (3, 6, 3, 2, 6, 10, 7, 4),  # odd head sizes, Dv != Dh: the scalar path
    (1, 2, 1, 5, 2, 2, 5, 0),  # Dh = 2, the whole cache
    (2, 8, 4, 70, 64, 64, 80, 9),  # a prefill-sized step: many CTAs and a separate length advance
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, dtype, shape):
    B = shape[0]
    for cos_batch, table_dtype, layout in [(1, dtype, "bthd"), (B, torch.float32, "bhtd")]:
        case = step_case(device, dtype, *shape, cos_batch=cos_batch, table_dtype=table_dtype, layout=layout)
        q_ptr, untouched = case[0].data_ptr(), case[0].stride()
        got, want = run_and_reference(case)
        assert got[0].data_ptr() == q_ptr and got[0].stride() == untouched  # q in place
        # The rotation is rope's fp32 arithmetic rounded once, and so is the reference's: equal
        # bit for bit; v and the other slots are copies.
        for name, g, w in zip(("q", "key_cache", "value_cache"), got[:3], want[:3]):
            assert torch.equal(g, w), name
        assert got[3].item() == want[3].item() == shape[-1] + shape[3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_equals_rope_then_static_cache_update(device, dtype):
    """What it replaces in transformers' attention: rope_ of q and k, then StaticLayer.update
    (cumulative_length is the length), step after step."""
    transformers = pytest.importorskip("transformers")
    from transformers.cache_utils import StaticLayer

    if not isinstance(getattr(StaticLayer(max_cache_len=4), "cumulative_length", None), torch.Tensor):
        pytest.skip("this transformers' StaticLayer counts its slots on the host")
    B, Hq, Hk, Dh, L = 2, 8, 2, 32, 12
    theirs = StaticLayer(max_cache_len=L)
    ours_keys = ours_values = ours_length = None
    for step, T in enumerate([4, 1, 1, 3, 1]):
        q, k, v, cos, sin, *_ = step_case(device, dtype, B, Hq, Hk, T, Dh, Dh, L, 0, layout="bthd")
        q_theirs, k_theirs = block_ops.rope_(q.clone(), k.clone(), cos, sin)
        keys, values = theirs.update(k_theirs, v)
        if ours_keys is None:  # transformers allocates its cache at the first update; start from a copy of it
            ours_keys, ours_values = torch.zeros_like(keys), torch.zeros_like(values)
            ours_length = torch.zeros((), dtype=torch.int64, device=device)
        q_ours = block_ops.rope_append_kv_(q, k, v, cos, sin, ours_keys, ours_values, ours_length)
        assert torch.equal(q_ours, q_theirs), step
        assert torch.equal(ours_keys, keys) and torch.equal(ours_values, values), step
        assert ours_length.item() == theirs.cumulative_length.item(), step


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
def test_cuda_matches_cpu_and_replays_in_a_graph():
    case = step_case("cpu", torch.bfloat16, 1, 32, 8, 1, 128, 128, 24, 3, table_dtype=torch.float32)
    on_cuda = [t.cuda() for t in case]
    block_ops.rope_append_kv_(*case)
    block_ops.rope_append_kv_(*on_cuda)
    for got, want in zip(on_cuda, case):
        assert torch.equal(got.cpu(), want)
    # Captured once, replayed: each replay reads the advanced length from the device.
    q, k, v, cos, sin, keys, values, length = on_cuda
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        OPS.rope_append_kv_(q, k, v, cos, sin, keys, values, length)
    torch.cuda.current_stream().wait_stream(stream)
    # Capture does not run the kernel: the length is still 4.
    for expected in (5, 6, 7):
        graph.replay()
        torch.cuda.synchronize()
        assert length.item() == expected
        rotated_k = reference.rope(q, k, cos, sin)[1].to(keys.dtype)
        assert torch.equal(keys[:, :, expected - 1 : expected], rotated_k)
        assert torch.equal(values[:, :, expected - 1 : expected], v)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_steps(device):
    q, k, v, cos, sin, keys, values, length = step_case(device, torch.float32, 2, 4, 2, 0, 8, 8, 6, 2)
    before = keys.clone(), values.clone()
    block_ops.rope_append_kv_(q, k, v, cos, sin, keys, values, length)
    assert length.item() == 2 and torch.equal(keys, before[0]) and torch.equal(values, before[1])
    # no batch rows: nothing is written, the count still moves (as StaticLayer's does)
    q, k, v, cos, sin, keys, values, length = step_case(device, torch.float32, 0, 4, 2, 3, 8, 8, 6, 2)
    block_ops.rope_append_kv_(q, k, v, cos, sin, keys, values, length)
    assert length.item() == 5


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    case = step_case(device, torch.bfloat16, 1, 4, 2, 2, 8, 8, 6, 1)
    q, k, v, cos, sin, keys, values, length = case

    def call(**changes):
        args = dict(q=q, k=k, v=v, cos=cos, sin=sin, key_cache=keys, value_cache=values, length=length) | changes
        OPS.rope_append_kv_(*args.values())

    with pytest.raises(RuntimeError, match="q must be \\[B, Hq, T, Dh\\] with unit stride along Dh"):
        call(q=q.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(RuntimeError, match="v must be \\[B, Hk, T, Dv\\]"):
        call(v=v[:, :1])
    with pytest.raises(RuntimeError, match="v must have q's dtype"):
        call(v=v.float())
    with pytest.raises(RuntimeError, match="key_cache must be \\[B, Hk, L, 8\\]"):
        call(key_cache=keys[:, :, :, :4])
    with pytest.raises(RuntimeError, match="value_cache must have key_cache's L"):
        call(value_cache=values[:, :, :5])
    with pytest.raises(RuntimeError, match="key_cache must have q's dtype"):
        call(key_cache=keys.float())
    with pytest.raises(RuntimeError, match="key_cache must have unit stride"):
        call(key_cache=keys.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(RuntimeError, match="length must have dtype|length must be"):
        call(length=length.float())
    with pytest.raises(RuntimeError, match="length must hold one int64"):
        call(length=torch.zeros(2, dtype=torch.int64, device=device))
    with pytest.raises(RuntimeError, match="key_cache and value_cache share memory"):
        call(value_cache=keys)
    with pytest.raises(RuntimeError, match="key_cache and k share memory"):
        call(k=keys[:, :, :2])
    with pytest.raises(RuntimeError, match="q and v share memory"):  # (v aliasing a whole q of as many heads)
        same_heads = step_case(device, torch.bfloat16, 1, 2, 2, 2, 8, 8, 6, 1)
        OPS.rope_append_kv_(same_heads[0], same_heads[1], same_heads[0], *same_heads[3:])
    with pytest.raises(RuntimeError, match="cos must be \\[1 or B, T, Dh\\]"):
        call(cos=cos[:, :1], sin=sin[:, :1])
    with pytest.raises(RuntimeError, match="rope_append_kv_ writes in place and has no autograd"):
        block_ops.rope_append_kv_(q.detach().requires_grad_(True), k, v, cos, sin, keys, values, length)
    if device == "cpu":  # CUDA checks the bound on the device (a device-side error, as index_copy_'s)
        full = torch.tensor(5, dtype=torch.int64)
        with pytest.raises(RuntimeError, match="the cache is full: length 5 \\+ 2 new tokens > 6 slots"):
            call(length=full)
        assert full.item() == 5
    if HAS_CUDA:
        other = "cpu" if device == "cuda" else "cuda"
        with pytest.raises(RuntimeError, match="length must be on|length.*device"):
            call(length=length.to(other))
    # Nothing above wrote anything.
    assert length.item() == 1


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype, shape, table_dtype in [
        (torch.float32, (2, 4, 2, 2, 8, 8, 40, 3), torch.float32),
        (torch.bfloat16, (1, 4, 2, 1, 16, 16, 40, 0), torch.float32),
        (torch.float16, (1, 2, 1, 3, 6, 10, 40, 5), torch.float16),
    ]:
        case = step_case(device, dtype, *shape, table_dtype=table_dtype)
        torch.library.opcheck(OPS.rope_append_kv_.default, tuple(case))


# ---- the wiring: the fused attention writes transformers' StaticCache with it -------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: q/k norms before the rope
def test_fused_attention_decodes_the_same_through_it(device, arch, monkeypatch):
    """qlora_ext.generate on a model with the fused block ops: every decode step's attention writes
    the StaticCache through rope_append_kv_, and the logits of every step equal, bit for bit, those
    of the rope_ + StaticLayer.update path it replaces (the same arithmetic)."""
    pytest.importorskip("transformers")
    from qlora_ext import fused_blocks
    from qlora_ext.generation import _HFDecoder
    from train_helpers import VOCAB, hf_model

    from test_block_ops import qwen3_model

    model = (qwen3_model(torch.bfloat16) if arch == "qwen3" else hf_model(arch, dtype=torch.bfloat16)).to(device).eval()
    assert qlora_ext.enable_fused_block_ops(model, devices=(device,)) > 0
    calls = []
    real = block_ops.rope_append_kv_
    monkeypatch.setattr(block_ops, "rope_append_kv_", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    prompt = torch.randint(0, min(VOCAB, model.config.vocab_size), (2, 5), device=device)

    monkeypatch.setattr(fused_blocks, "DECODE_ATTENTION_ENABLED", False)  # SDPA in both (test_decode_attention.py)

    def decode(enabled):
        monkeypatch.setattr(fused_blocks, "ROPE_APPEND_KV_ENABLED", enabled)
        calls.clear()
        decoder = _HFDecoder(model, batch=2, max_len=9, device=torch.device(device))
        slot_mask = torch.ones(2, 9, dtype=torch.bool, device=device)
        logits = []
        with torch.no_grad():
            for step, tokens in enumerate([prompt, prompt[:, :1], prompt[:, 1:2], prompt[:, 2:3]]):
                start = 0 if step == 0 else 4 + step
                positions = torch.arange(start, start + tokens.shape[1], device=device)
                logits.append(decoder.forward(tokens, positions.expand(2, -1), positions, slot_mask))
        return logits, list(calls)

    fused, fused_calls = decode(True)
    plain, plain_calls = decode(False)
    layers = model.config.num_hidden_layers
    assert plain_calls == [] and fused_calls == [1] * (3 * layers)  # the prefill allocates the cache: not fused
    for step, (a, b) in enumerate(zip(fused, plain)):
        assert torch.equal(a, b), step


def test_fused_attention_declines_what_it_cannot_write():
    pytest.importorskip("transformers")
    from transformers.cache_utils import DynamicLayer, StaticLayer

    from qlora_ext.fused_blocks import _is_plain_static_layer, _static_cache_layer

    assert _is_plain_static_layer(StaticLayer)
    assert not _is_plain_static_layer(DynamicLayer)

    class Changed(StaticLayer):  # a subclass may update differently
        pass

    assert not _is_plain_static_layer(Changed)
    B, T, Hq, Hk, Dh = 1, 1, 4, 2, 8
    q, k, v = torch.randn(B, T, Hq, Dh), torch.randn(B, T, Hk, Dh), torch.randn(B, Hk, T, Dh)

    class Cache:
        def __init__(self, layer, offloading=False):
            self.layers, self.offloading = [layer], offloading

    layer = StaticLayer(max_cache_len=4)
    assert _static_cache_layer(Cache(layer), 0, q, k, v) is None  # not allocated yet (the prefill does it)
    layer.update(torch.randn(B, Hk, 2, Dh), torch.randn(B, Hk, 2, Dh))
    assert _static_cache_layer(Cache(layer), 0, q, k, v) is layer
    assert _static_cache_layer(Cache(layer, offloading=True), 0, q, k, v) is None
    assert _static_cache_layer(Cache(layer), 1, q, k, v) is None
    assert _static_cache_layer(Cache(layer), 0, q.bfloat16(), k.bfloat16(), v.bfloat16()) is None  # dtype
    assert _static_cache_layer(Cache(layer), 0, q, k, v[..., :4]) is None  # head size
    with torch.enable_grad():
        assert _static_cache_layer(Cache(layer), 0, q.requires_grad_(True), k, v) is None
