"""qlora_ext.generate: static-KV-cache decoding (and CUDA graphs) against plain full-forward loops,
transformers' own generate, per-row runs of padded batches; eos, sampling, argument errors; the
decode-sized LoRA route; transformers' model.generate on a prepared model; the decode benchmark's
--tiny smoke run.

The models are tiny and fp32 on the CPU, so cached and uncached forwards agree to ~1e-6 and
greedy tokens agree exactly. On CUDA the graph replay must give bit-identical tokens to eager
steps (the same kernels on the same inputs).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from train_helpers import VOCAB, hf_model, prepared_hf, randomize_adapters, token_batch

import qlora_ext
from qlora_ext import generation
from qlora_ext.builtin import TinyLlama, TinyLlamaConfig
from qlora_ext.layers import QLoRALinear
from qlora_ext.lora_linear import nf4_lora_decode

REPO = Path(__file__).resolve().parents[1]

TINY_BUILTIN = TinyLlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)  # fmt: skip


# ---- models ------------------------------------------------------------------------------------


def builtin_model(prepared: bool = True, device="cpu", dtype=torch.float32):
    model = TinyLlama.from_seed(TINY_BUILTIN, seed=3).to(device=device, dtype=dtype)
    if prepared:
        qlora_ext.prepare(model, r=4, alpha=8, verbose=False)
        randomize_adapters(model, std=0.2)
    return model.eval()


def next_logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    logits = out[1] if isinstance(out, tuple) else out.logits
    return logits[:, -1]


@torch.no_grad()
def naive_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The reference: a full forward over the whole sequence for every new token, argmax."""
    for _ in range(n):
        ids = torch.cat([ids, next_logits(model, ids).argmax(-1, keepdim=True)], dim=1)
    return ids


def left_padded(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


LLAMA_LORA = pytest.param(lambda: prepared_hf("llama", "active"), id="llama-lora")
BUILTIN_LORA = pytest.param(lambda: builtin_model(prepared=True), id="builtin-lora")
MODELS = [
    LLAMA_LORA,
    pytest.param(lambda: prepared_hf("llama", "merged"), id="llama-merged"),
    pytest.param(lambda: prepared_hf("llama", "disabled"), id="llama-disabled"),
    pytest.param(lambda: prepared_hf("qwen2", "active"), id="qwen2-lora"),
    pytest.param(lambda: prepared_hf("mistral", "active"), id="mistral-lora"),
    pytest.param(lambda: prepared_hf("gpt2", "active"), id="gpt2-lora"),
    pytest.param(lambda: prepared_hf("phi", "active"), id="phi-lora"),
    pytest.param(lambda: hf_model("llama"), id="llama-unprepared"),
    BUILTIN_LORA,
    pytest.param(lambda: builtin_model(prepared=False), id="builtin-float"),
]


# ---- greedy decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("make_model", MODELS)
def test_greedy_equals_naive_loop(make_model):
    model = make_model()
    ids = token_batch(batch=2, seq=7, seed=5)
    stats = {}
    out = qlora_ext.generate(model, ids, 12, stats=stats)
    assert out.dtype == torch.long and out.shape == (2, 7 + 12)
    assert torch.equal(out, naive_greedy(model, ids, 12))
    assert stats["new_tokens"] == 12 and stats["decode_steps"] == 11 and stats["cuda_graphs"] is False


@pytest.mark.parametrize("method", ["dora", "lora_fa", "vera", "delta_lora"])
def test_greedy_equals_naive_loop_for_the_lora_family(method):
    model = hf_model("llama")
    qlora_ext.prepare(model, r=4, alpha=8, method=method, verbose=False)
    randomize_adapters(model, std=0.2)
    ids = token_batch(batch=2, seq=7, seed=5)
    assert torch.equal(qlora_ext.generate(model, ids, 10), naive_greedy(model.eval(), ids, 10))


def test_adapter_states_change_the_tokens():
    # Guards the test above: active, merged and disabled adapters must give different models,
    # or "equals the naive loop" would not show that generate applies each of them.
    ids = token_batch(batch=2, seq=7, seed=5)
    outs = {s: qlora_ext.generate(prepared_hf("llama", s), ids, 12) for s in ("active", "merged", "disabled")}
    assert not torch.equal(outs["active"], outs["disabled"])
    assert not torch.equal(outs["merged"], outs["disabled"])


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_equals_transformers_generate(padded):
    model = prepared_hf("llama", "active")
    if padded:
        ids, mask = left_padded([token_batch(1, 9, seed=1)[0], token_batch(1, 4, seed=2)[0]])
    else:
        ids, mask = token_batch(batch=2, seq=6, seed=3), None
    ours = qlora_ext.generate(model, ids, 10, attention_mask=mask)
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=10,
                            do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("make_model", [LLAMA_LORA, BUILTIN_LORA])
def test_left_padded_batch_equals_rows_alone(make_model):
    model = make_model()
    rows = [token_batch(1, n, seed=10 + n)[0] for n in (3, 8, 5)]
    ids, mask = left_padded(rows, pad=7)
    batched = qlora_ext.generate(model, ids, 9, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = qlora_ext.generate(model, row.unsqueeze(0), 9)
        assert torch.equal(batched[i, ids.shape[1] :], alone[0, len(row) :]), f"row {i}"
        assert torch.equal(batched[i, : ids.shape[1]], ids[i])


def test_bool_and_int_masks_agree():
    model = builtin_model()
    ids, mask = left_padded([token_batch(1, 6, seed=1)[0], token_batch(1, 2, seed=2)[0]])
    a = qlora_ext.generate(model, ids, 5, attention_mask=mask)
    b = qlora_ext.generate(model, ids, 5, attention_mask=mask.bool())
    assert torch.equal(a, b)


# ---- eos -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_model", [LLAMA_LORA, BUILTIN_LORA])
def test_eos_stops_generation(make_model):
    model = make_model()
    ids = token_batch(batch=2, seq=5, seed=8)
    free = qlora_ext.generate(model, ids, 16)[:, 5:]  # [2, 16] without eos
    # An eos that row 0 produces at step k (its first occurrence), and row 1 later or never.
    k = 3
    eos = int(free[0, k])
    first = [int((r == eos).nonzero()[0]) if (r == eos).any() else None for r in free]
    out = qlora_ext.generate(model, ids, 16, eos_token_id=eos, pad_token_id=VOCAB + 5)
    if first[1] is None:
        assert out.shape[1] == 5 + 16
    else:
        assert out.shape[1] == 5 + max(first) + 1
    for i, f in enumerate(first):
        new = out[i, 5:]
        stop = len(new) if f is None else f + 1
        assert torch.equal(new[:stop], free[i, :stop])  # identical up to and including eos
        assert (new[stop:] == VOCAB + 5).all()  # padding after it


def test_eos_single_row_stops_at_first_eos_and_accepts_several_ids():
    model = builtin_model()
    ids = token_batch(batch=1, seq=4, seed=9)
    free = qlora_ext.generate(model, ids, 12)[0, 4:]
    first = int((free == free[5]).nonzero()[0])
    unused = min(set(range(VOCAB)) - set(free.tolist()))
    out = qlora_ext.generate(model, ids, 12, eos_token_id=[unused, int(free[5])])
    assert torch.equal(out[0, 4:], free[: first + 1])


# ---- sampling ------------------------------------------------------------------------------------


def test_sampling_with_a_seed_is_reproducible_and_leaves_the_global_rng():
    model = builtin_model()
    ids = token_batch(batch=3, seq=4, seed=1)
    state = torch.get_rng_state()
    a = qlora_ext.generate(model, ids, 20, do_sample=True, temperature=1.5, seed=123)
    b = qlora_ext.generate(model, ids, 20, do_sample=True, temperature=1.5, seed=123)
    c = qlora_ext.generate(model, ids, 20, do_sample=True, temperature=1.5, seed=124)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, qlora_ext.generate(model, ids, 20))  # sampled, not greedy


@pytest.mark.parametrize("kwargs", [{"top_k": 1}, {"top_p": 1e-6}], ids=["top_k=1", "top_p=tiny"])
def test_sampling_restricted_to_the_top_token_is_greedy(kwargs):
    model = builtin_model()
    ids = token_batch(batch=2, seq=4, seed=2)
    sampled = qlora_ext.generate(model, ids, 10, do_sample=True, temperature=3.0, seed=0, **kwargs)
    assert torch.equal(sampled, qlora_ext.generate(model, ids, 10))


def test_sampling_distribution_and_filters():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(40000, 4).contiguous()
    g = torch.Generator().manual_seed(0)

    def freq(**kw):
        tokens = generation._choose(logits, True, kw.get("temperature", 1.0), kw.get("top_k", 0),
                                    kw.get("top_p", 1.0), g)  # fmt: skip
        return torch.bincount(tokens, minlength=4).float() / len(tokens)

    # 40000 draws: the standard error of each frequency is <= 0.0025; allow 4 of them.
    torch.testing.assert_close(freq(), probs, atol=0.01, rtol=0)
    torch.testing.assert_close(freq(top_k=2), torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=0.01, rtol=0)
    # top_p=0.5: token 0 (mass before it 0) and token 1 (0.4 < 0.5) stay; token 2 (0.7) goes.
    torch.testing.assert_close(freq(top_p=0.5), torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=0.01, rtol=0)
    tempered = (probs.log() / 2).softmax(0)
    torch.testing.assert_close(freq(temperature=2.0), tempered, atol=0.01, rtol=0)


# ---- bad arguments -------------------------------------------------------------------------------


BAD = [
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be a positive int"),
    ({"max_new_tokens": 2.0}, ValueError, "max_new_tokens must be a positive int"),
    ({"input_ids": torch.zeros(5, dtype=torch.long)}, ValueError, r"input_ids must be a \[batch, length\]"),
    ({"input_ids": torch.zeros(1, 3)}, ValueError, r"input_ids must be a \[batch, length\] int64"),
    ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, ValueError, "at least one token per row"),
    ({"input_ids": torch.full((1, 3), VOCAB)}, ValueError, rf"token ids in \[0, {VOCAB}\)"),
    ({"input_ids": [[1, 2]]}, TypeError, "input_ids must be a tensor"),
    ({"attention_mask": torch.ones(2, 3)}, ValueError, "attention_mask must be a tensor shaped like input_ids"),
    ({"attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])}, ValueError, "pad on the left"),
    ({"attention_mask": torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]])}, ValueError, "zeros may only precede"),
    ({"attention_mask": torch.tensor([[0, 2, 1, 1], [1, 1, 1, 1]])}, ValueError, "only 0 .padding. and 1"),
    ({"temperature": 0.0, "do_sample": True}, ValueError, "temperature must be a finite number > 0"),
    ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"top_k": -1}, ValueError, "top_k must be an int >= 0"),
    ({"do_sample": 1}, TypeError, "do_sample must be a bool"),
    ({"eos_token_id": -1}, ValueError, "eos_token_id must be a token id"),
    ({"eos_token_id": []}, ValueError, "eos_token_id must be a token id"),
    ({"eos_token_id": "2"}, ValueError, "eos_token_id must be a token id"),
    ({"pad_token_id": -3}, ValueError, "pad_token_id must be a token id"),
    ({"cuda_graphs": "yes"}, ValueError, "cuda_graphs must be 'auto', True or False"),
    ({"cuda_graphs": True}, ValueError, "cuda_graphs=True needs the model and input_ids on a CUDA device"),
    ({"seed": 1.5}, TypeError, "seed must be an int or None"),
    ({"max_new_tokens": 100}, ValueError, "max_position_embeddings=64"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD, ids=[f"{i}-{next(iter(k))}" for i, (k, _, _) in enumerate(BAD)])
def test_bad_arguments(kwargs, error, match):
    model = builtin_model(prepared=False)
    args = {"input_ids": token_batch(batch=2, seq=4), "max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=match):
        qlora_ext.generate(model, args.pop("input_ids"), args.pop("max_new_tokens"), **args)


def test_unsupported_models_are_named():
    with pytest.raises(TypeError, match="model must be a transformers causal LM or qlora_ext's TinyLlama, got Linear"):
        qlora_ext.generate(torch.nn.Linear(2, 2), token_batch(1, 3), 2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        qlora_ext.generate("gpt2", token_batch(1, 3), 2)


def test_unsupported_attention_implementation():
    model = hf_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="supports attn_implementation .* the model uses 'flash_attention_2'"):
        qlora_ext.generate(model, token_batch(1, 3), 2)


def test_eager_attention_implementation():
    transformers = pytest.importorskip("transformers")
    from train_helpers import hf_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config("llama"), attn_implementation="eager").eval()
    ids, mask = left_padded([token_batch(1, 6, seed=1)[0], token_batch(1, 3, seed=2)[0]])
    ours = qlora_ext.generate(model, ids, 8, attention_mask=mask)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_restores_training_mode_and_grad_mode():
    model = prepared_hf("llama")
    model.train()
    model.model.layers[0].eval()
    qlora_ext.generate(model, token_batch(1, 3), 2)
    assert model.training and model.lm_head.training and not model.model.layers[0].training
    assert torch.is_grad_enabled()


# ---- transformers' generate on a prepared model ----------------------------------------------------


def test_transformers_generate_on_a_prepared_model_in_training_mode():
    # prepare() turns on gradient checkpointing, under which transformers' layers drop the cache
    # in training mode: model.generate must still decode correctly right after training.
    model = prepared_hf("llama")
    ids = token_batch(batch=2, seq=5, seed=4)
    expected = naive_greedy(model, ids, 8)
    model.train()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)
    assert model.training
    assert torch.equal(qlora_ext.generate(model, ids, 8), expected)


def test_generate_in_eval_mode_only_wraps_transformers_models():
    assert not generation.generate_in_eval_mode(builtin_model(prepared=False))
    model = hf_model("llama")
    assert generation.generate_in_eval_mode(model)
    assert generation.generate_in_eval_mode(model)  # idempotent
    assert model.generate.__func__ is generation._generate_eval_mode


# ---- the decode-sized LoRA route -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3])
def test_lora_decode_matches_the_training_op(dtype, rows):
    # nf4_lora_decode (fused gemv + thin products in the adapter's fp32) against the fp32
    # reference; in bf16 its error may be at most 2x that of the training op (FlashAttention rule).
    torch.manual_seed(0)
    n, k, r = 40, 96, 4
    weight = qlora_ext.NF4Weight.from_float(torch.randn(n, k) * 0.1)
    a, b = torch.randn(r, k) * 0.1, torch.randn(n, r) * 0.1
    bias = torch.randn(n).to(dtype)
    x = torch.randn(rows, 1, k).to(dtype)
    w = weight.dequantize(torch.float32).double()
    reference = F.linear(x.double(), w, bias.double()) + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    ours = nf4_lora_decode(x, weight, bias, a, b, 0.5)
    training = qlora_ext.nf4_lora_linear(x, weight, bias, a, b, 0.5)
    assert ours.dtype == dtype and ours.shape == (rows, 1, n)
    err_ours = (ours.double() - reference).abs().max().item()
    err_training = (training.double() - reference).abs().max().item()
    if dtype == torch.float32:
        assert err_ours < 1e-5
    else:
        ulp = torch.finfo(dtype).eps * reference.abs().max().item()
        assert err_ours <= 2 * err_training + ulp


def test_gemv_route_never_on_cpu_or_with_grad(caplog):
    weight = qlora_ext.NF4Weight.from_float(torch.randn(8, 64))
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    with caplog.at_level(logging.DEBUG, logger="qlora_ext"):
        assert not qlora_ext.ops.gemv_route(x, weight, caller="probe")
    assert any("probe: dequantize + linear (M=1, N=8, K=64" in r.getMessage() for r in caplog.records)


# ---- CUDA: graphs -------------------------------------------------------------------------------------


CUDA_MODELS = [
    pytest.param(lambda: prepared_hf("llama", "active", torch.bfloat16, "cuda"), id="llama-lora"),
    pytest.param(lambda: prepared_hf("llama", "merged", torch.bfloat16, "cuda"), id="llama-merged"),
    pytest.param(lambda: prepared_hf("llama", "disabled", torch.bfloat16, "cuda"), id="llama-disabled"),
    pytest.param(lambda: hf_model("llama", dtype=torch.bfloat16).cuda(), id="llama-bf16"),
    pytest.param(lambda: builtin_model(True, "cuda", torch.bfloat16), id="builtin-lora"),
]


@requires_cuda
@pytest.mark.parametrize("make_model", CUDA_MODELS)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_cuda_graph_equals_eager(make_model, padded):
    model = make_model()
    if padded:
        ids, mask = left_padded([token_batch(1, 9, seed=1)[0], token_batch(1, 4, seed=2)[0]])
        ids, mask = ids.cuda(), mask.cuda()
    else:
        ids, mask = token_batch(batch=2, seq=6, seed=3).cuda(), None
    n = generation.GRAPH_WARMUP_STEPS + 20
    eager_stats, graph_stats = {}, {}
    eager = qlora_ext.generate(model, ids, n, attention_mask=mask, cuda_graphs=False, stats=eager_stats)
    graphed = qlora_ext.generate(model, ids, n, attention_mask=mask, cuda_graphs=True, stats=graph_stats)
    assert graph_stats["cuda_graphs"] is True and eager_stats["cuda_graphs"] is False
    assert torch.equal(graphed, eager)
    # and sampling through the graph draws the same tokens for the same seed
    kw = dict(attention_mask=mask, do_sample=True, top_p=0.9, temperature=0.8, seed=7)
    assert torch.equal(qlora_ext.generate(model, ids, n, cuda_graphs=True, **kw),
                       qlora_ext.generate(model, ids, n, cuda_graphs=False, **kw))  # fmt: skip


@requires_cuda
def test_cuda_graph_eos_and_repeated_calls():
    model = prepared_hf("llama", "active", torch.bfloat16, "cuda")
    ids = token_batch(batch=1, seq=5, seed=8).cuda()
    n = generation.GRAPH_WARMUP_STEPS + 3 * generation.EOS_CHECK_INTERVAL
    free = qlora_ext.generate(model, ids, n, cuda_graphs=False)
    eos = int(free[0, 5 + generation.GRAPH_WARMUP_STEPS + 4])
    first = int((free[0, 5:] == eos).nonzero()[0])
    for _ in range(2):  # a second call captures a fresh graph over a fresh cache
        out = qlora_ext.generate(model, ids, n, eos_token_id=eos, cuda_graphs=True)
        assert torch.equal(out[0], free[0, : 5 + first + 1])


@requires_cuda
def test_cuda_decode_takes_the_fused_gemv(caplog):
    model = prepared_hf("llama", "active", torch.bfloat16, "cuda")
    ids = token_batch(batch=1, seq=20).cuda()
    with caplog.at_level(logging.DEBUG, logger="qlora_ext"):
        qlora_ext.generate(model, ids, 3, cuda_graphs=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("nf4_lora_linear: nf4_gemv (M=1,") for m in messages)
    # The prefill (20 rows) takes nf4_gemm where K % 64 == 0, else dequantize + linear.
    prefill = [m for m in messages if m.startswith("nf4_lora_linear: ") and "(M=20," in m]
    assert prefill
    for m in prefill:
        k = int(m.split("K=")[1].split(",")[0])
        route = "nf4_gemm" if k % 64 == 0 and qlora_ext.ops.NF4_GEMM_ENABLED else "dequantize + linear"
        assert m.startswith(f"nf4_lora_linear: {route} (M=20,"), m


@requires_cuda
def test_cuda_graph_fp32_equals_naive_loop():
    # fp32 on CUDA takes the dense route (no gemv): greedy tokens through the graph must equal the
    # full-forward loop, as on the CPU.
    model = prepared_hf("llama", device="cuda")
    ids = token_batch(batch=2, seq=6, seed=3).cuda()
    out = qlora_ext.generate(model, ids, generation.GRAPH_WARMUP_STEPS + 10, cuda_graphs=True)
    assert torch.equal(out, naive_greedy(model, ids, generation.GRAPH_WARMUP_STEPS + 10))


# ---- the benchmark's smoke run -----------------------------------------------------------------------


def test_bench_decode_tiny(tmp_path, monkeypatch, capsys):
    # In this process, so that it imports the qlora_ext under test (an installed package or the
    # source tree, whichever the tests run against).
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_decode  # noqa: PLC0415

    out = tmp_path / "decode.json"
    try:
        assert bench_decode.main(["--tiny", "--out", str(out)]) == 0
    finally:
        sys.modules.pop("bench_decode", None)
    result = json.loads(out.read_text())
    stacks = {case["stack"]: case for case in result["cases"]}
    assert {"bf16", "nf4_merged", "nf4_lora"} <= set(stacks)
    for case in stacks.values():
        assert case["decode_tokens_per_s"] > 0 and case["new_tokens"] == result["new_tokens"]
        assert case["weight_bytes_per_token"] > 0
    assert stacks["nf4_merged"]["weight_bytes_per_token"] < stacks["bf16"]["weight_bytes_per_token"]
    assert result["ratio_vs_bf16"]["nf4_merged"] > 0
    assert "tokens/s" in capsys.readouterr().out  # the table


def test_cast_adapters_once_reuses_the_cast_inside_the_context_only():
    from qlora_ext import lora_linear

    a = torch.randn(4, 8)
    assert lora_linear._adapter_in(a, torch.float32) is a
    assert lora_linear._adapter_in(a, torch.bfloat16) is not lora_linear._adapter_in(a, torch.bfloat16)
    with lora_linear.cast_adapters_once():
        first = lora_linear._adapter_in(a, torch.bfloat16)
        with lora_linear.cast_adapters_once():  # nested: the same cache
            assert lora_linear._adapter_in(a, torch.bfloat16) is first
        assert lora_linear._adapter_in(a, torch.bfloat16) is first
        assert torch.equal(first, a.to(torch.bfloat16))
    assert lora_linear._adapter_casts is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_argmax_rows_is_argmax(device):
    """generate's two-pass argmax over vocabulary-sized rows: the first maximal index, as
    torch.argmax, ties and NaN included."""
    from qlora_ext.generation import _argmax_rows

    gen = torch.Generator().manual_seed(0)
    for V in (128256, 32000, 50257, 100):
        x = torch.randn(3, V, generator=gen).to(device)
        x[1, V // 3] = x[1, V - 1] = x[1].max() + 1  # a tie: the first one wins
        x[2, V // 2] = float("nan")  # NaN is the max
        for two_pass in (None, True):
            assert torch.equal(_argmax_rows(x, two_pass), x.argmax(dim=-1)), (V, two_pass)
        x[0, :] = 0.0  # all equal: index 0
        assert _argmax_rows(x, True)[0].item() == 0
