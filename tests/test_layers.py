"""QLoRALinear: forward vs the dequantized reference, adapters API, merge, state dict, devices,
torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from train_helpers import devices

import qlora_ext
from qlora_ext import LoRAAdapter, QLoRALinear


def make_layer(k=48, n=40, bias=True, seed=0, device="cpu", dtype=torch.float32, **lora):
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias).to(device, dtype)
    layer = QLoRALinear.from_linear(linear)
    layer.add_adapter("default", **{"r": 4, "alpha": 8, **lora})
    return linear, layer


def randomize(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("bias", [True, False])
def test_zero_B_equals_dequantized_linear(bias, device):
    linear, layer = make_layer(bias=bias, device=device)
    x = torch.randn(3, 5, 48, device=device)
    expected = nn.functional.linear(x, layer.weight.dequantize(), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert layer.weight.device.type == device


def test_lora_forward_and_grads_match_reference():
    _, layer = make_layer(rslora=True)
    randomize(layer)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (4, 48) and b.shape == (40, 4)
    assert layer.adapters["default"].scale == pytest.approx(8 / 2)  # alpha / sqrt(r)
    x = torch.randn(6, 48, requires_grad=True)
    layer(x).square().sum().backward()
    x_r, a_r, b_r = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    y_r = x_r @ layer.weight.dequantize().t() + layer.bias + 4.0 * (x_r @ a_r.t()) @ b_r.t()
    y_r.square().sum().backward()
    for ours, ref in ((x.grad, x_r.grad), (a.grad, a_r.grad), (b.grad, b_r.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert layer.bias.grad is None and not layer.bias.requires_grad


def test_init_matches_peft_convention():
    _, layer = make_layer(k=64, n=32)
    ad = layer.adapters["default"]
    assert isinstance(ad, LoRAAdapter) and ad.scale == 2.0  # alpha / r
    assert torch.count_nonzero(ad.lora_B.weight) == 0
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on [r, in] gives U(-1/sqrt(in), 1/sqrt(in))
    assert 0 < ad.lora_A.weight.abs().max() <= bound
    assert ad.lora_A.weight.dtype == torch.float32


def test_adapter_switching():
    linear, layer = make_layer()
    layer.add_adapter("other", r=2, alpha=2)
    randomize(layer)
    x = torch.randn(4, 48)
    base = layer.base_forward(x)
    assert layer.active_adapter == "default"
    y_default = layer(x)
    layer.set_adapter("other")
    y_other = layer(x)
    assert not torch.allclose(y_default, y_other)
    layer.disable_adapters()
    torch.testing.assert_close(layer(x), base)
    layer.enable_adapters()
    torch.testing.assert_close(layer(x), y_other)
    layer.delete_adapter("other")
    assert layer.active_adapter is None and list(layer.adapters) == ["default"]
    torch.testing.assert_close(layer(x), base)
    with pytest.raises(ValueError, match="no adapter"):
        layer.set_adapter("missing")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default")


def test_dropout_only_in_training():
    _, layer = make_layer(dropout=0.5)
    randomize(layer)
    x = torch.randn(8, 48)
    layer.eval()
    y_eval = layer(x)
    manual = layer.base_forward(x) + layer.adapters["default"].delta(x)
    torch.testing.assert_close(y_eval, manual, rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(0)
    y_train = layer(x)
    assert not torch.allclose(y_train, y_eval)
    y_train.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


def test_merge_is_lossy_but_close_and_unmerge_restores():
    _, layer = make_layer(k=128, n=64)
    randomize(layer)
    x = torch.randn(4, 128)
    y = layer(x)
    layer.merge()
    assert layer.merged and layer.current_adapter() is None
    y_merged = layer(x)
    rel = (y_merged - y).norm() / y.norm()
    assert rel < 0.15, rel  # requantizing W + ΔW to NF4 costs about one NF4 rounding
    layer.unmerge()
    assert not layer.merged
    assert (layer(x) - y).norm() / y.norm() < 0.25


def test_state_dict_round_trip_uses_bnb_keys():
    _, layer = make_layer()
    randomize(layer)
    sd = layer.state_dict()
    assert {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4", "bias"} <= set(sd)  # fmt: skip
    _, other = make_layer(seed=5)
    other.load_state_dict(sd)
    x = torch.randn(3, 48)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    bad = dict(sd)
    del bad["weight.absmax"]
    with pytest.raises(RuntimeError, match="absmax"):
        other.load_state_dict(bad)


def test_dtype_casts_leave_the_nf4_weight_alone():
    _, layer = make_layer()
    packed = layer.weight.packed.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.absmax.dtype == torch.uint8 and torch.equal(layer.weight.packed, packed)
    assert layer.weight.nested.absmax2.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.bfloat16
    y = layer(torch.randn(2, 48, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_compute_dtype():
    linear = nn.Linear(48, 40)
    layer = QLoRALinear.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 48)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = nn.functional.linear(x.bfloat16(), layer.weight.dequantize(torch.bfloat16), linear.bias.bfloat16())
    torch.testing.assert_close(y, expected.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moves_to_cuda_and_back():
    _, layer = make_layer()
    randomize(layer)
    x = torch.randn(3, 48)
    y = layer(x)
    layer.cuda()
    assert layer.weight.device.type == "cuda" and layer.weight.nested.code.device.type == "cuda"
    torch.testing.assert_close(layer(x.cuda()).cpu(), y, rtol=1e-4, atol=1e-4)
    layer.cpu()
    assert layer.weight.device.type == "cpu"


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    if backend == "inductor":
        import shutil

        if shutil.which("cc") is None and shutil.which("gcc") is None:
            pytest.skip("inductor on CPU needs a C compiler")
    _, layer = make_layer()
    randomize(layer)
    x = torch.randn(4, 48, requires_grad=True)
    y_eager = layer(x)
    y_eager.sum().backward()
    g_eager = (x.grad.clone(), layer.lora_A["default"].weight.grad.clone())
    x.grad = None
    layer.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, g_eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, g_eager[1], rtol=1e-5, atol=1e-5)
