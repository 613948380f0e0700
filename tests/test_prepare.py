"""prepare(): targets, freezing, equality with the dequantized base, errors, and training
(QLoRA's loss curve vs plain LoRA on the float base)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from train_helpers import dequantized_copy, hf_model, logits, plain_lm, randomize_adapters, token_batch

import qlora_ext
from qlora_ext.prepare import qlora_layers

ARCHS = ["llama", "mistral", "qwen2", "gpt2", "phi"]
# Linear layers of a decoder block, by last name, that "all-linear" must adapt (and how many per block).
PER_BLOCK = {"gpt2": 4, "phi": 6}
BLOCK_LINEARS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},  # GPT-2 Conv1D, weight [in, out]
    "phi": {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_transformers_model(arch, capsys):
    model = hf_model(arch)
    ids = token_batch()
    torch.manual_seed(7)
    qlora_ext.prepare(model, r=4, alpha=8)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("trainable params: ") and " || all params: " in line and " || trainable%: " in line

    layers = qlora_layers(model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == BLOCK_LINEARS[arch]
    assert len(layers) == 2 * PER_BLOCK.get(arch, 7)
    assert not isinstance(model.get_output_embeddings(), qlora_ext.QLoRALinear)  # LM head excluded
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing

    # B = 0: the prepared model computes exactly the dequantized-base model.
    reference = dequantized_copy(model, hf_model(arch, seed=1))
    model.eval()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)

    # A training step reaches every adapter (nonzero grads once B != 0).
    randomize_adapters(model)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_gpt2_conv1d_orientation():
    """Conv1D stores [in, out]: the quantized layer must hold the transpose and compute the same."""
    model = hf_model("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, 64)
    y_float = conv(x)
    qlora_ext.prepare(model, r=4, verbose=False)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and tuple(layer.weight.shape) == (192, 64)
    rel = (layer(x) - y_float).norm() / y_float.norm()
    assert rel < 0.12, rel  # one NF4 rounding


def test_prepare_plain_module():
    model = plain_lm()
    ids = token_batch()
    qlora_ext.prepare(model, r=4, verbose=False)
    assert set(qlora_layers(model)) == {"blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"}
    assert isinstance(model.lm_head, nn.Linear)
    reference = dequantized_copy(model, plain_lm(seed=3))
    torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)


def test_tied_head_excluded_without_its_name():
    model = plain_lm()
    model.proj_out = model.lm_head  # another name for the head: found via the tied embedding
    model.lm_head.weight = model.embed.weight
    del model.lm_head
    qlora_ext.prepare(model, verbose=False)
    assert "proj_out" not in qlora_layers(model)


def test_bf16_model_keeps_its_dtype():
    model = hf_model("llama", dtype=torch.bfloat16)
    qlora_ext.prepare(model, r=4, verbose=False)
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        assert model(token_batch()).logits.dtype == torch.bfloat16
    out = model(token_batch(), labels=token_batch())  # training: the fused loss, logits not formed
    assert out.logits is None and out.loss.dtype == torch.float32
    out.loss.backward()


def test_target_list_and_regex():
    model = hf_model("llama")
    qlora_ext.prepare(model, target_modules=["q_proj", "v_proj"], verbose=False)
    assert {n.rsplit(".", 1)[-1] for n in qlora_layers(model)} == {"q_proj", "v_proj"}
    model = hf_model("llama")
    qlora_ext.prepare(model, target_modules=r".*layers\.0\.mlp\..*", verbose=False)
    assert set(qlora_layers(model)) == {f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}


def test_second_adapter_on_prepared_model():
    model = hf_model("llama")
    qlora_ext.prepare(model, r=4, verbose=False)
    qlora_ext.prepare(model, r=2, adapter_name="second", verbose=False)
    layer = model.model.layers[1].mlp.down_proj
    assert set(layer.adapters) == {"default", "second"} and layer.active_adapter == "second"
    qlora_ext.set_adapter(model, "default")
    assert layer.active_adapter == "default"
    with pytest.raises(ValueError, match="already has an adapter"):
        qlora_ext.prepare(model, adapter_name="second", verbose=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="match no linear layer.*q_proj"):
        qlora_ext.prepare(hf_model("llama"), target_modules=["q_proj", "query"], verbose=False)
    for r in (0, -1, 2.5):
        with pytest.raises(ValueError, match="r .*positive int"):
            qlora_ext.prepare(hf_model("llama"), r=r, verbose=False)
    with pytest.raises(ValueError, match="dropout"):
        qlora_ext.prepare(plain_lm(), dropout=1.5, verbose=False)
    with pytest.raises(TypeError, match="nn.Module"):
        qlora_ext.prepare(torch.zeros(3), verbose=False)

    int_model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    int_model[0].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match=r"0\.weight has dtype torch.int32.*float model"):
        qlora_ext.prepare(int_model, verbose=False)
    assert isinstance(int_model[1], nn.Linear)  # nothing was changed before the error

    with pytest.raises(ValueError, match="no linear layers"):
        qlora_ext.prepare(nn.Sequential(nn.ReLU()), verbose=False)


# ---- training --------------------------------------------------------------------------------


class FloatLoRALinear(nn.Module):
    """Plain LoRA on a float base (the reference run): linear(x) + s·(x·Aᵀ)·Bᵀ."""

    def __init__(self, linear: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.linear, self.scale = linear, scale
        self.lora_A = nn.Parameter(a.detach().clone())
        self.lora_B = nn.Parameter(b.detach().clone())

    def forward(self, x):
        return self.linear(x) + self.scale * (x @ self.lora_A.t()) @ self.lora_B.t()


def float_lora_twin(prepared: nn.Module, arch: str) -> nn.Module:
    """The unquantized base model with plain LoRA adapters initialised like `prepared`'s."""
    model = hf_model(arch, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in qlora_layers(prepared).items():
        ad = layer.adapters["default"]
        parent, _, child = name.rpartition(".")
        twin = FloatLoRALinear(model.get_submodule(name), ad.lora_A.weight, ad.lora_B.weight, ad.scale)
        setattr(model.get_submodule(parent), child, twin)
    return model


def train(model: nn.Module, ids: torch.Tensor, steps: int = 50, lr: float = 5e-3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_loss_falls_and_tracks_float_lora():
    """50 AdamW steps on a fixed batch: the QLoRA loss falls, and its whole curve stays within 2%
    of plain LoRA on the unquantized fp32 base started from the same adapter init.

    Why 2% holds: the base is a randomly initialised model (std 0.02 weights), whose NF4 rounding
    error (~8% of each weight) moves the logits far less than the adapters' training does; the
    measured gap is about 0.5%. A pretrained model would be measured the same way on real data.
    """
    ids = token_batch(batch=4, seq=16)
    qlora = hf_model("llama", seed=0)
    torch.manual_seed(123)
    qlora_ext.prepare(qlora, r=8, alpha=16, verbose=False)
    reference = float_lora_twin(qlora, "llama")
    q_losses = train(qlora, ids)
    f_losses = train(reference, ids)
    assert q_losses[-1] < 0.8 * q_losses[0], q_losses
    rel = max(abs(q - f) / f for q, f in zip(q_losses, f_losses))
    assert rel < 0.02, (rel, q_losses[::10], f_losses[::10])


def test_plain_module_trains():
    model = plain_lm()
    qlora_ext.prepare(model, r=4, alpha=8, verbose=False)
    ids = token_batch(batch=4, seq=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prepare_on_cuda_matches_cpu(dtype):
    """Quantization happens on the weight's device; CUDA and CPU give the same model."""
    ids = token_batch()
    cpu = hf_model("llama", dtype=dtype)
    cuda = hf_model("llama", dtype=dtype).cuda()
    for m in (cpu, cuda):
        torch.manual_seed(7)
        qlora_ext.prepare(m, r=4, verbose=False)
        randomize_adapters(m)
    layer = cuda.model.layers[0].mlp.up_proj
    assert layer.weight.device.type == "cuda" and layer.lora_A["default"].weight.device.type == "cuda"
    assert torch.equal(layer.weight.packed.cpu(), cpu.model.layers[0].mlp.up_proj.weight.packed)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(logits(cuda, ids.cuda()).float().cpu(), logits(cpu, ids).float(), rtol=tol, atol=tol)
    cuda.train()
    cuda(ids.cuda(), labels=ids.cuda()).loss.backward()
    assert all(p.grad is not None for p in cuda.parameters() if p.requires_grad)
