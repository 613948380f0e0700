"""Adapter files in PEFT's format (both directions, with PEFT itself when installed), validation
of bad adapter files, and merged dense exports that transformers loads."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import dequantized_copy, hf_model, logits, plain_lm, randomize_adapters, token_batch

import qlora_ext
from qlora_ext.adapters_io import CONFIG_NAME, WEIGHTS_NAME
from qlora_ext.prepare import qlora_layers


def prepared(arch="llama", r=4, alpha=8, seed=0, adapter_seed=1, **kw):
    model = hf_model(arch, seed=seed)
    torch.manual_seed(99)
    qlora_ext.prepare(model, r=r, alpha=alpha, verbose=False, **kw)
    randomize_adapters(model, seed=adapter_seed)
    return model.eval()


def adapter_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_unchanged(model, before):
    after = adapter_params(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_save_writes_peft_format(tmp_path):
    model = prepared(rslora=True)
    qlora_ext.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"] is True
    assert config["bias"] == "none" and config["lora_dropout"] == 0.0
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4) and a.dtype == torch.float32
    assert len(tensors) == 2 * 7 * 2


def test_round_trip_into_fresh_model(tmp_path):
    ids = token_batch()
    model = prepared()
    qlora_ext.save_adapter(model, tmp_path)
    other = prepared(adapter_seed=5)
    assert not torch.allclose(logits(other, ids), logits(model, ids))
    qlora_ext.load_adapter(other, tmp_path)
    torch.testing.assert_close(logits(other, ids), logits(model, ids), rtol=0, atol=0)


def test_load_as_new_named_adapter(tmp_path):
    ids = token_batch()
    model = prepared(alpha=16)
    qlora_ext.save_adapter(model, tmp_path)
    other = prepared(alpha=4, adapter_seed=5)
    qlora_ext.load_adapter(other, tmp_path, adapter_name="loaded")
    layer = other.model.layers[0].self_attn.q_proj
    assert set(layer.adapters) == {"default", "loaded"} and layer.active_adapter == "loaded"
    assert layer.adapters["loaded"].scale == 4.0  # alpha 16 / r 4, from the file's config
    torch.testing.assert_close(logits(other, ids), logits(model, ids), rtol=0, atol=0)
    qlora_ext.save_adapter(other, tmp_path / "again", adapter_name="loaded")
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text())["lora_alpha"] == 16


def test_peft_keys_with_adapter_name_inside(tmp_path):
    ids = token_batch()
    model = prepared()
    qlora_ext.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / WEIGHTS_NAME)
    other = prepared(adapter_seed=5)
    qlora_ext.load_adapter(other, tmp_path)
    torch.testing.assert_close(logits(other, ids), logits(model, ids), rtol=0, atol=0)


# ---- bad adapter directories: a clear ValueError, and the model unchanged --------------------


def _corrupt(tmp_path, how):
    weights = tmp_path / WEIGHTS_NAME
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "missing-key":
        del tensors[key]
        save_file(tensors, weights)
    elif how == "extra-key":
        tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = tensors[key].clone()
        save_file(tensors, weights)
    elif how == "int-dtype":
        tensors[key] = tensors[key].to(torch.int32)
        save_file(tensors, weights)
    elif how == "nan":
        tensors[key][0, 0] = float("nan")
        save_file(tensors, weights)
    elif how == "bad-json":
        (tmp_path / CONFIG_NAME).write_text("{not json")
    elif how == "not-lora":
        (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "IA3"}))
    elif how == "no-weights":
        weights.unlink()


BAD = {
    "truncated": f"{WEIGHTS_NAME}: not a valid safetensors file",
    "missing-key": "missing key .*layers.0.self_attn.q_proj.lora_A.weight",
    "extra-key": "unexpected key .*layers.9",
    "int-dtype": "lora_A.weight.*dtype torch.int32",
    "nan": "NaN",
    "bad-json": f"{CONFIG_NAME}: not valid JSON",
    "not-lora": "peft_type 'IA3' is not supported",
    "no-weights": f"{WEIGHTS_NAME}: file not found",
}


@pytest.mark.parametrize("how", list(BAD))
def test_bad_adapter_files(tmp_path, how):
    qlora_ext.save_adapter(prepared(), tmp_path)
    _corrupt(tmp_path, how)
    target = prepared(adapter_seed=5)
    before = adapter_params(target)
    with pytest.raises(ValueError, match=BAD[how]):
        qlora_ext.load_adapter(target, tmp_path)
    assert_unchanged(target, before)


def test_wrong_rank_and_wrong_architecture(tmp_path):
    qlora_ext.save_adapter(prepared(r=4), tmp_path / "r4")
    target = prepared(r=8)
    before = adapter_params(target)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*q_proj.lora_A.weight.*shape \(4, 64\).*\(8, 64\)"):
        qlora_ext.load_adapter(target, tmp_path / "r4")
    qlora_ext.save_adapter(prepared("gpt2"), tmp_path / "gpt2")
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: missing key"):
        qlora_ext.load_adapter(target, tmp_path / "gpt2")
    with pytest.raises(ValueError, match="not a quantized layer"):
        qlora_ext.load_adapter(target, tmp_path / "gpt2", adapter_name="new")
    assert_unchanged(target, before)


def test_failed_save_leaves_existing_files(tmp_path):
    qlora_ext.save_adapter(prepared(), tmp_path)
    files = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.raises(ValueError, match="no adapter named 'missing'"):
        qlora_ext.save_adapter(prepared(adapter_seed=3), tmp_path, adapter_name="missing")
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == files


def test_load_needs_prepared_model(tmp_path):
    qlora_ext.save_adapter(prepared(), tmp_path)
    with pytest.raises(ValueError, match="prepare"):
        qlora_ext.load_adapter(hf_model("llama"), tmp_path)


# ---- PEFT interop ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_loads_our_adapter(tmp_path, arch):
    peft = pytest.importorskip("peft")
    ids = token_batch()
    model = prepared(arch, rslora=True)
    qlora_ext.save_adapter(model, tmp_path)
    base = dequantized_copy(model, hf_model(arch, seed=3))
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_we_load_peft_adapter(tmp_path, arch):
    peft = pytest.importorskip("peft")
    ids = token_batch()
    model = prepared(arch, r=8)
    base = dequantized_copy(model, hf_model(arch, seed=3))
    config = peft.LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                             task_type="CAUSAL_LM", fan_in_fan_out=arch == "gpt2")  # fmt: skip
    peft_model = peft.get_peft_model(base, config).eval()
    peft_model.save_pretrained(str(tmp_path))
    qlora_ext.load_adapter(model, tmp_path)
    assert all(layer.adapters["default"].scale == 4.0 for layer in qlora_layers(model).values())  # alpha 32 / r 8
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), rtol=1e-5, atol=1e-5)


# ---- merged export -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_and_export_loads_in_transformers(tmp_path, arch, dtype):
    transformers = pytest.importorskip("transformers")
    ids = token_batch()
    model = prepared(arch)
    expected = logits(model, ids)
    before = adapter_params(model)
    qlora_ext.merge_and_export(model, tmp_path, dtype=dtype)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert loaded.dtype == dtype
    got = logits(loaded, ids).float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    else:
        assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert_unchanged(model, before)


def test_merge_and_export_plain_module(tmp_path):
    ids = token_batch()
    model = plain_lm()
    qlora_ext.prepare(model, r=4, verbose=False)
    randomize_adapters(model)
    qlora_ext.merge_and_export(model, tmp_path, dtype=torch.float32)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    fresh = plain_lm(seed=4)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=1e-5, atol=1e-5)
