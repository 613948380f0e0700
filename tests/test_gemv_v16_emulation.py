"""The data layout of benchmarks/gpu_checks/gemv_v16_experiment.py's kernel (16-byte code loads,
the two quantization blocks of a half-step kept apart in the MMA's column pairs), emulated lane by
lane on the CPU: with exact NF4 values it must give the fp32 reference's product up to summation
order. (The kernel itself needs a GPU and CuPy; this checks the indexing it is written with.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import qlora_ext
from qlora_ext import ops, reference

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")

GPU_CHECKS = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_checks"


@pytest.fixture
def experiment(monkeypatch):
    monkeypatch.syspath_prepend(str(GPU_CHECKS.parent))
    monkeypatch.syspath_prepend(str(GPU_CHECKS))
    import gemv_v16_experiment  # noqa: PLC0415

    yield gemv_v16_experiment
    sys.modules.pop("gemv_v16_experiment", None)


@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_emulated_layout_gives_the_reference_product(experiment, M):
    N, K = 32, 2048  # two tiles; every warp one step
    q = qlora_ext.NF4Weight.from_float(torch.randn(N, K) * 0.05, blocksize=64, double_quant=True)
    x = torch.randn(M, K)
    args = ops._weight_args(q)
    ref = reference.nf4_gemv(x, *args[:4], None, *args[4:])
    got = experiment.emulate(x, q)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_emulation_catches_a_wrong_layout(experiment, monkeypatch):
    # the test above can fail: the same emulation with the two blocks' scales swapped is far off
    N, K = 16, 2048
    q = qlora_ext.NF4Weight.from_float(torch.randn(N, K) * 0.05, blocksize=64, double_quant=True)
    x = torch.randn(1, K)
    args = ops._weight_args(q)
    ref = reference.nf4_gemv(x, *args[:4], None, *args[4:])
    real = reference.nested_absmax

    def swapped(*a, **kw):
        s = real(*a, **kw)
        return s.reshape(-1, 2).flip(1).reshape(-1)

    monkeypatch.setattr(experiment.reference, "nested_absmax", swapped)
    got = experiment.emulate(x, q)
    assert (got - ref).abs().max() > 1e-3


@pytest.mark.parametrize("M", [1, 5, 16])
def test_ring32_emulated_layout_gives_the_reference_product(experiment, M):
    # gemv_ring32 (M <= 16, 32-row tiles, the k order inside each block): two tiles, 8 steps
    N, K = 64, 1024
    q = qlora_ext.NF4Weight.from_float(torch.randn(N, K) * 0.05, blocksize=64, double_quant=True)
    x = torch.randn(M, K)
    args = ops._weight_args(q)
    ref = reference.nf4_gemv(x, *args[:4], None, *args[4:])
    got = experiment.emulate_ring32(x, q)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_ring32_emulation_catches_a_wrong_layout(experiment, monkeypatch):
    # the test above can fail: with the two blocks of every step swapped in the scales it is far off
    N, K = 32, 1024
    q = qlora_ext.NF4Weight.from_float(torch.randn(N, K) * 0.05, blocksize=64, double_quant=True)
    x = torch.randn(3, K)
    args = ops._weight_args(q)
    ref = reference.nf4_gemv(x, *args[:4], None, *args[4:])
    real = reference.nested_absmax

    def swapped(*a, **kw):
        return real(*a, **kw).reshape(-1, 2).flip(1).reshape(-1)

    monkeypatch.setattr(experiment.reference, "nested_absmax", swapped)
    got = experiment.emulate_ring32(x, q)
    assert (got - ref).abs().max() > 1e-3
