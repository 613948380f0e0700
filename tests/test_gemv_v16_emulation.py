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


@pytest.mark.parametrize("M", [1, 2, 4, 7, 16])  # 7, 16: gemv_ring_mc's column groups
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


@pytest.mark.parametrize("n_tiles,n_steps,grid", [(896, 16, 396), (256, 56, 396), (256, 16, 396), (1792, 32, 264),
                                                  (3, 8, 396), (125, 24, 264)])
def test_balanced_plan_covers_every_item_once(experiment, n_tiles, n_steps, grid):
    # gemv_ring_sk's split (balanced_plan mirrors its index arithmetic): every (tile, step) item once,
    # each warp's producer issuing exactly the sequence its consumer loops over, a shared tile's CTAs
    # in distinct slots below max_parts, and no CTA with more than per_cta items
    plan = experiment.balanced_plan(n_tiles, n_steps, grid)
    seen = [item for items in plan["consumed"].values() for item in items]
    assert sorted(seen) == [(tile, step) for tile in range(n_tiles) for step in range(n_steps)]
    assert plan["issued"] == plan["consumed"]
    for tile, slots in plan["slots"].items():
        parts = {p for _, p in slots}
        assert len(parts) == 1, (tile, slots)
        (count,) = parts
        assert sorted(s for s, _ in slots) == list(range(count)) and count <= plan["max_parts"], (tile, slots)
    per_cta = {}
    for (cta, _), items in plan["consumed"].items():
        per_cta[cta] = per_cta.get(cta, 0) + len(items)
    assert max(per_cta.values()) <= plan["per_cta"]
