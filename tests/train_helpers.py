"""Tiny models and helpers shared by the training-library tests (prepare, layers, adapter I/O).

Models are built from small configs (hidden 32-64, 2 layers) with fixed seeds, so every test is
fast on a CPU and deterministic.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qlora_ext

VOCAB = 64

# The tests multiply tiny matrices, where waking OpenMP threads costs far more than the work (on a
# loaded 2-core machine, 20 ms per matmul instead of 4 us). One thread keeps the suite fast.
torch.set_num_threads(1)

devices = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def hf_config(arch: str):
    """A tiny transformers config of `arch` (llama, mistral, qwen2, qwen3, gpt2, phi)."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16)
    if arch == "phi":
        return transformers.PhiConfig(**common)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)  # fmt: skip
    raise ValueError(arch)


def hf_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **config_changes):
    """A tiny transformers model of `arch`; `config_changes` override config fields (e.g. head_dim)."""
    transformers = pytest.importorskip("transformers")
    config = hf_config(arch)
    for name, value in config_changes.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def builtin_tiny_llama(dtype=torch.float32, layers: int = 2):
    """The package's own TinyLlama at the test size (vocab 64, hidden 64, 4/2 heads)."""
    from qlora_ext.builtin.tiny_llama import TinyLlama, TinyLlamaConfig

    cfg = TinyLlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)  # fmt: skip
    return TinyLlama.from_seed(cfg, seed=0).to(dtype)


def llama_with_biases(flag: str, projections, dtype=torch.float32):
    """transformers' test Llama with config.<flag> (attention_bias, mlp_bias) on and random biases
    on projections(layer), so that a wrong bias path shows."""
    transformers = pytest.importorskip("transformers")
    config = hf_config("llama")
    setattr(config, flag, True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in projections(layer):
                proj.bias.normal_()
    return model


def train_biases(model, projections) -> None:
    """Trains the biases of projections(layer) (prepare froze them), so their gradients are checked."""
    for layer in model.model.layers:
        for proj in projections(layer):
            proj.bias.requires_grad_(True)


def assert_fused_bf16_within_twice_the_modules(make_model, ids: torch.Tensor) -> None:
    """FlashAttention's rule for a fused unit: against an fp32 run of the same weights, the fused
    path in bf16 errs at most twice as much as the module-by-module path in bf16, in every token's
    loss and in every gradient (largest absolute error each). make_model(fused) builds the fp32
    model (fused unit on or off), a transformers causal LM.

    Per token, not the mean loss: the mean's error is a sum of signed per-token errors whose size
    is mostly cancellation luck (the K-extended MLP in bf16, seeds 1-5 and 7: 0.1x to 3.6x the
    module path's, with its largest per-token error 0.9x to 1.5x)."""
    results = {}
    for name, fused, dtype in (("ref", False, torch.float32), ("fused", True, torch.bfloat16),
                               ("plain", False, torch.bfloat16)):  # fmt: skip
        model = make_model(fused)
        model.to(dtype)  # the base model in dtype; NF4 codes unchanged; adapters follow
        logits = model(input_ids=ids).logits.float()
        token_losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                       reduction="none")  # fmt: skip
        token_losses.mean().backward()
        results[name] = (token_losses.detach(), {n: g.float() for n, g in trainable_grads(model).items()})
    ref_losses, ref_grads = results["ref"]
    for name in ref_grads:
        err = (results["fused"][1][name] - ref_grads[name]).abs().max()
        base = (results["plain"][1][name] - ref_grads[name]).abs().max()
        assert err <= 2 * base + 1e-6, (name, float(err), float(base))
    err = (results["fused"][0] - ref_losses).abs().max()
    base = (results["plain"][0] - ref_losses).abs().max()
    assert err <= 2 * base + 1e-6, ("token losses", float(err), float(base))


class PlainLM(nn.Module):
    """Not a transformers model: embedding -> 2 x (MLP block) -> `lm_head`."""

    def __init__(self, dim: int = 32, vocab: int = VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(dim, 2 * dim), "down": nn.Linear(2 * dim, dim, bias=False)}) for _ in range(2)
        )
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = x + b["down"](torch.relu(b["up"](x)))
        return self.lm_head(x)


def plain_lm(seed: int = 0) -> PlainLM:
    torch.manual_seed(seed)
    return PlainLM()


def logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def dequantized_copy(prepared: nn.Module, fresh: nn.Module, adapter_name: str = "") -> nn.Module:
    """`fresh` (an unprepared model of the same architecture) loaded with the prepared model's
    dequantized base weights (plus `adapter_name` merged, "" for none), in fp32."""
    sd = qlora_ext.merged_state_dict(prepared, dtype=None, adapter_name=adapter_name)
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k for k in missing), missing  # only a tied head may be absent
    return fresh.eval()


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give every adapter parameter random values (fresh LoRA has B = 0, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def token_batch(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, ids):
    """The causal-LM loss of `ids` (labels = inputs) for transformers and built-in models alike."""
    out = model(input_ids=ids, labels=ids)
    return out[0] if isinstance(out, tuple) else out.loss


def trainable_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def sgd_step(*models, lr: float = 0.05) -> None:
    """An SGD update of every trainable parameter, so that later steps see different adapters."""
    for model in models:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(p.grad, alpha=-lr)
                    p.grad = None


def train_side_by_side(fused, plain, device, steps: int):
    """`steps` SGD steps of both models on the same batches: the same loss and gradients at each
    (fp32 round-off). Yields each step's gradients (names -> tensors) for the caller's coverage
    checks before the step is taken."""
    for step in range(steps):
        ids = token_batch(batch=2, seq=12, seed=step).to(device)
        loss, ref = lm_loss(fused, ids), lm_loss(plain, ids)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        got, want = trainable_grads(fused), trainable_grads(plain)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
        yield want
        sgd_step(fused, plain)


class CountApplies:
    """Counts calls of an autograd Function's `apply` (monkeypatched for one test)."""

    def __init__(self, monkeypatch, function):
        self.n = 0
        original = function.apply

        def counted(*args):
            self.n += 1
            return original(*args)

        monkeypatch.setattr(function, "apply", counted)


def force_fused_linear_route(monkeypatch) -> list:
    """Make every `_ops.linear_route` answer ROUTE_GEMV (the CUDA decode route), served by a plain
    dequantize + linear, so the CPU can check who steps aside for it. Returns the callers seen."""
    from qlora_ext import _ops

    callers = []

    def gemv_route(x, weight, bias=None, trainable=(), caller=""):
        callers.append(caller)
        return _ops.ROUTE_GEMV

    monkeypatch.setattr(_ops, "linear_route", gemv_route)
    monkeypatch.setattr(_ops, "fused_linear",
                        lambda x, w, b, route: torch.nn.functional.linear(x, w.dequantize(x.dtype), b))  # fmt: skip
    return callers


class CountDoRANorms:
    """Counts the DoRA norms computed (per projection): dora.dora_scale calls, plus each stacked
    layer of dora.dora_scale_stacked (the fused Q/K/V unit's three norms in one call)."""

    def __init__(self, monkeypatch):
        from qlora_ext import dora

        self.n, self.stacked_calls = 0, 0
        one, stacked = dora.dora_scale, dora.dora_scale_stacked

        def counted_one(*args):
            self.n += 1
            return one(*args)

        def counted_stacked(*args):
            self.n += len(args[5])  # rows: one entry per stacked layer
            self.stacked_calls += 1
            return stacked(*args)

        monkeypatch.setattr(dora, "dora_scale", counted_one)
        monkeypatch.setattr(dora, "dora_scale_stacked", counted_stacked)


def cuda_kernel_names(fn) -> list[str]:
    """The names of the CUDA kernels that fn() launches (torch.profiler; not under the sanitizer,
    whose CUPTI use excludes the profiler's: mark such tests not_under_sanitizer)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def prepared_hf(arch: str = "llama", state: str = "active", dtype=torch.float32, device="cpu"):
    """A tiny transformers model prepared with random LoRA adapters, the adapters `state`:
    "active", "merged" (folded into the NF4 base) or "disabled"."""
    from qlora_ext.layers import QLoRALinear

    model = hf_model(arch, dtype=dtype).to(device)
    qlora_ext.prepare(model, r=4, alpha=8, verbose=False)
    randomize_adapters(model, std=0.2)
    for layer in model.modules():
        if isinstance(layer, QLoRALinear):
            if state == "merged":
                layer.merge()
            elif state == "disabled":
                layer.disable_adapters()
    return model.eval()


def record_parks(monkeypatch) -> list:
    """What qlora_ext.checkpointing parks in host memory from now on, one entry each: True for a
    layer input (chained to the previous layer's), False for a value parked alone beside it,
    ("together", n) for n tensors of a remembered tuple parked in one buffer."""
    from qlora_ext import checkpointing

    parks: list = []
    park, park_together = checkpointing._offloader.park, checkpointing._offloader.park_together

    def spy(tensor, chain=True):
        parks.append(chain)
        return park(tensor, chain)

    def spy_together(value):
        out = park_together(value)
        members = sum(isinstance(t, checkpointing._Member) for t in out)
        if members:
            parks.append(("together", members))
        return out

    monkeypatch.setattr(checkpointing._offloader, "park", spy)
    monkeypatch.setattr(checkpointing._offloader, "park_together", spy_together)
    return parks


class CountGemms:
    """Context manager: `n`, the GEMM calls (aten mm, addmm, addmm_ in any overload) dispatched
    inside the block, on any device."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer, self.n = self, 0
        packets = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                outer.n += func.overloadpacket in packets
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)
