"""The AdamW operators against their pure-PyTorch references (bit for bit on the CPU), opcheck,
and argument errors. CUDA cases skip without a GPU."""

from __future__ import annotations

import pytest
import torch

import qlora_ext
from qlora_ext.codebooks import dynamic_map
from qlora_ext.optim import ops
from qlora_ext.optim import reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 255, 256, 257, 4096, 70001]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def _state32(n, device):
    return torch.zeros(n, device=device), torch.zeros(n, device=device)


def _state8(n, device):
    nb = -(-n // 256)
    return [torch.full((n,), 127, dtype=torch.uint8, device=device), torch.zeros(nb, device=device),
            torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(nb, device=device)]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_adamw_step_matches_reference(device, dtype, n):
    torch.manual_seed(n)
    p = torch.randn(n, device=device).to(dtype)
    p_ref = p.cpu().clone()
    m, v = _state32(n, device)
    m_ref, v_ref = _state32(n, "cpu")
    for step in range(1, 6):
        g = torch.randn(n, device=device).to(dtype)
        ops.adamw_step(p, g, m, v, step=step, grad_scale=0.5, **HYPER)
        ref.adamw_step(p_ref, g.cpu(), m_ref, v_ref, step=step, grad_scale=0.5, **HYPER)
    # the kernels round every operation as the reference does: same bits on CPU and CUDA
    assert torch.equal(p.cpu(), p_ref)
    assert torch.equal(m.cpu(), m_ref)
    assert torch.equal(v.cpu(), v_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_adamw_step_8bit_matches_reference(device, dtype, n):
    torch.manual_seed(n)
    maps = dynamic_map(True, device), dynamic_map(False, device)
    p = torch.randn(n, device=device).to(dtype)
    p_ref = p.cpu().clone()
    st, st_ref = _state8(n, device), _state8(n, "cpu")
    for step in range(1, 6):
        g = torch.randn(n, device=device).to(dtype)
        ops.adamw_step_8bit(p, g, *st, *maps, step=step, **HYPER)
        ref.adamw_step_8bit(p_ref, g.cpu(), *st_ref, dynamic_map(True), dynamic_map(False), step=step, **HYPER)
    assert torch.equal(p.cpu(), p_ref)
    for a, b in zip(st, st_ref):
        assert torch.equal(a.cpu(), b)


def test_multi_tensor_call_equals_one_call_per_tensor():
    torch.manual_seed(0)
    sizes = [3, 5000, 1, 40000]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    ps = [torch.randn(n).to(dt) for n, dt in zip(sizes, dtypes)]
    gs = [torch.randn(n).to(dt) for n, dt in zip(sizes, dtypes)]
    ps2 = [p.clone() for p in ps]
    st = [_state32(n, "cpu") for n in sizes]
    st2 = [_state32(n, "cpu") for n in sizes]
    ops.adamw_step(ps, gs, [m for m, _ in st], [v for _, v in st], step=1, **HYPER)
    for p, g, (m, v) in zip(ps2, gs, st2):
        ops.adamw_step(p, g, m, v, step=1, **HYPER)
    for a, b in zip(ps + [t for s in st for t in s], ps2 + [t for s in st2 for t in s]):
        assert torch.equal(a, b)


def _samples32(device, requires_grad=False):
    for dtype in DTYPES:
        ps = [torch.randn(n, device=device).to(dtype) for n in (1, 300)]
        gs = [torch.randn_like(p) for p in ps]
        yield (ps, gs, [torch.zeros(p.numel(), device=device) for p in ps],
               [torch.zeros(p.numel(), device=device) for p in ps], 1e-3, 0.9, 0.999, 1e-8, 0.01, 3, 1.0)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_adamw_step(device):
    for args in _samples32(device):
        torch.library.opcheck(torch.ops.qlora_ext.adamw_step, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_adamw_step_8bit(device):
    for dtype in DTYPES:
        ps = [torch.randn(n, device=device).to(dtype) for n in (5, 600)]
        gs = [torch.randn_like(p) for p in ps]
        states = [_state8(p.numel(), device) for p in ps]
        args = (ps, gs, *[[s[k] for s in states] for k in range(4)], dynamic_map(True, device),
                dynamic_map(False, device), 1e-3, 0.9, 0.999, 1e-8, 0.01, 2, 0.5)  # fmt: skip
        torch.library.opcheck(torch.ops.qlora_ext.adamw_step_8bit, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_build_dispatches_cuda_kernel():
    assert qlora_ext.build_info()["with_cuda"]
    p = torch.randn(10, device="cuda")
    m, v = _state32(10, "cuda")
    ops.adamw_step(p, torch.randn_like(p), m, v, step=1, **HYPER)  # raises if no CUDA kernel
    assert m.abs().sum().item() > 0


def _call32(**overrides):
    args = dict(params=[torch.randn(4)], grads=[torch.randn(4)], exp_avgs=[torch.zeros(4)],
                exp_avg_sqs=[torch.zeros(4)], step=1, **HYPER)  # fmt: skip
    args.update(overrides)
    ops.adamw_step(args.pop("params"), args.pop("grads"), args.pop("exp_avgs"), args.pop("exp_avg_sqs"), **args)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(exp_avgs=[torch.zeros(5)]), r"exp_avgs\[0\] must have 4 elements"),
        (dict(exp_avg_sqs=[torch.zeros(4, dtype=torch.float64)]), r"exp_avg_sqs\[0\] must be Float"),
        (dict(grads=[torch.randn(4).half()]), r"grads\[0\] must have its parameter's dtype"),
        (dict(params=[torch.randn(4).to(torch.complex64)]), r"params\[0\] must be float32"),
        (dict(params=[torch.randn(8)[::2]]), r"params\[0\] must be contiguous"),
        (dict(grads=[torch.randn(4), torch.randn(4)]), r"grads has 2 tensors but params has 1"),
        (dict(step=0), r"step must be >= 1"),
        (dict(lr=-1.0), r"lr must be"),
        (dict(beta2=1.0), r"beta2 must be in \[0, 1\)"),
        (dict(eps=0.0), r"eps must be"),
    ],
)
def test_adamw_step_errors_name_the_argument(overrides, match):
    with pytest.raises(RuntimeError, match=match):
        _call32(**overrides)


def test_sparse_grad_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"grads\[0\] must be a dense tensor"):
        _call32(grads=[torch.randn(4).to_sparse()])


def test_adamw_step_8bit_errors_name_the_argument():
    n = 300
    st = _state8(n, "cpu")
    maps = dynamic_map(True), dynamic_map(False)
    with pytest.raises(RuntimeError, match=r"exp_avg_absmax\[0\] must have 2 elements"):
        ops.adamw_step_8bit(torch.randn(n), torch.randn(n), st[0], torch.zeros(1), st[2], st[3], *maps, step=1, **HYPER)
    with pytest.raises(RuntimeError, match=r"exp_avg_sq_codes\[0\] must be Byte"):
        ops.adamw_step_8bit(torch.randn(n), torch.randn(n), st[0], st[1], torch.zeros(n), st[3], *maps, step=1, **HYPER)
    with pytest.raises(RuntimeError, match=r"exp_avg_map must be sorted"):
        ops.adamw_step_8bit(torch.randn(n), torch.randn(n), *st, maps[0].flip(0), maps[1], step=1, **HYPER)
    with pytest.raises(RuntimeError, match=r"exp_avg_sq_map must have 256 elements"):
        ops.adamw_step_8bit(torch.randn(n), torch.randn(n), *st, maps[0], maps[1][:10], step=1, **HYPER)


def test_reference_matches_torch_adamw_math():
    """The reference is AdamW: against torch.optim.AdamW on fp32 within rounding."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000))
    q = p.detach().clone()
    m, v = _state32(1000, "cpu")
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01)
    for step in range(1, 51):
        g = torch.randn(1000)
        p.grad = g.clone()
        opt.step()
        ref.adamw_step(q, g, m, v, step=step, **HYPER)
    torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-6)
