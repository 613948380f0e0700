"""Loading pre-quantized bitsandbytes NF4 checkpoints (the `*-bnb-4bit` layout) bit-exactly.

The checkpoint is made by transformers + bitsandbytes themselves (4-bit quantization on the CPU
works with bitsandbytes >= 0.48), so the test checks our reader against the real writer.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import hf_model, logits, token_batch

import qlora_ext
from qlora_ext.prepare import qlora_layers


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    """(float checkpoint dir, bnb-4bit checkpoint dir, the bnb model) of a tiny Llama."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("bnb")
    hf_model("llama").save_pretrained(root / "float")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    try:
        bnb_model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "float"), quantization_config=config, device_map="cpu")
    except Exception as exc:  # older bitsandbytes/transformers: 4-bit needs CUDA
        pytest.skip(f"transformers cannot quantize to 4 bit here: {exc}")
    bnb_model.save_pretrained(root / "bnb")
    return root / "float", root / "bnb", bnb_model.eval()


def test_layers_are_bit_exact(bnb_checkpoint):
    import bitsandbytes as bnb

    _, path, bnb_model = bnb_checkpoint
    model = qlora_ext.load_bnb_4bit(path)
    stored = load_file(path / "model.safetensors")
    layers = qlora_layers(model)
    assert len(layers) == 14 and "lm_head" not in layers
    for name, layer in layers.items():
        q = layer.weight
        assert torch.equal(q.packed.view(-1), stored[f"{name}.weight"].view(torch.uint8).view(-1)), name
        assert torch.equal(q.absmax, stored[f"{name}.weight.absmax"]), name
        assert torch.equal(q.nested.absmax2, stored[f"{name}.weight.nested_absmax"]), name
        ref = bnb_model.get_submodule(name).weight
        assert torch.equal(q.dequantize(), bnb.functional.dequantize_4bit(ref.data, ref.quant_state)), name
    ids = token_batch()
    torch.testing.assert_close(logits(model, ids), logits(bnb_model, ids), rtol=0, atol=0)


def test_loaded_model_prepares_and_trains(bnb_checkpoint, tmp_path):
    _, path, bnb_model = bnb_checkpoint
    model = qlora_ext.load_bnb_4bit(path)
    qlora_ext.prepare(model, r=4, verbose=False)
    ids = token_batch()
    model.eval()
    torch.testing.assert_close(logits(model, ids), logits(bnb_model, ids), rtol=1e-6, atol=1e-6)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # Our module state dict is bnb's layout: it loads back into a bnb-4bit transformers model.
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight.absmax"], bnb_model.state_dict()["model.layers.0.mlp.up_proj.weight.absmax"])


def test_prepare_converts_bnb_linear4bit_modules(bnb_checkpoint):
    """prepare() on a transformers model loaded in 4 bit by bitsandbytes takes its NF4 weights as is."""
    transformers = pytest.importorskip("transformers")
    _, path, bnb_model = bnb_checkpoint
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu").eval()
    ids = token_batch()
    expected = logits(model, ids)
    qlora_ext.prepare(model, r=4, verbose=False)
    assert len(qlora_layers(model)) == 14
    torch.testing.assert_close(logits(model.eval(), ids), expected, rtol=1e-6, atol=1e-6)


def test_missing_or_foreign_tensors_are_errors(bnb_checkpoint, tmp_path):
    _, path, _ = bnb_checkpoint
    stored = load_file(path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())

    broken = dict(stored)
    del broken["model.layers.0.self_attn.q_proj.weight.absmax"]
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="q_proj.weight.absmax"):
        qlora_ext.load_bnb_4bit(tmp_path)

    broken = dict(stored)
    del broken["model.norm.weight"]
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight"):
        qlora_ext.load_bnb_4bit(tmp_path)

    broken = dict(stored)
    broken["model.extra.weight"] = torch.zeros(2)
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.extra.weight"):
        qlora_ext.load_bnb_4bit(tmp_path)

    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        qlora_ext.load_bnb_4bit(tmp_path)


def test_fp4_is_refused(bnb_checkpoint, tmp_path):
    _, path, _ = bnb_checkpoint
    stored = load_file(path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(stored[key].tolist()))
    state["quant_type"] = "fp4"
    stored[key.replace("nf4", "fp4")] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    del stored[key]
    save_file(stored, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match="FP4"):
        qlora_ext.load_bnb_4bit(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_onto_cuda(bnb_checkpoint):
    _, path, bnb_model = bnb_checkpoint
    model = qlora_ext.load_bnb_4bit(path, device="cuda")
    assert all(layer.weight.device.type == "cuda" for layer in qlora_layers(model).values())
    ids = token_batch()
    torch.testing.assert_close(logits(model, ids.cuda()).cpu(), logits(bnb_model, ids), rtol=1e-4, atol=1e-4)
