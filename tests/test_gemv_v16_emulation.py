"""The data layouts of benchmarks/gpu_checks/gemv_v16_experiment.py's ring kernels, emulated lane by
lane on the CPU: gemv_ring (16-byte code loads, the two quantization blocks of a half-step kept apart
in the MMA's column pairs) and gemv_ring32 (M <= 16, the k order kept inside each block). With exact
NF4 values each must give the fp32 reference's product up to summation order. (The kernels
themselves need a GPU and CuPy; this checks the indexing they are written with.)"""

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


# (emulation, M, N, K): gemv_ring on two 16-row tiles with every warp one step (M <= 4); gemv_ring32
# (M <= 16, 32-row tiles, the k order inside each block) on two tiles of 8 steps
CASES = [("emulate", M, 32, 2048) for M in (1, 2, 3, 4)] + [("emulate_ring32", M, 64, 1024) for M in (1, 5, 16)]


def random_case(M, N, K):
    q = qlora_ext.NF4Weight.from_float(torch.randn(N, K) * 0.05, blocksize=64, double_quant=True)
    x = torch.randn(M, K)
    args = ops._weight_args(q)
    return x, q, reference.nf4_gemv(x, *args[:4], None, *args[4:])


@pytest.mark.parametrize("emulation,M,N,K", CASES)
def test_emulated_layout_gives_the_reference_product(experiment, emulation, M, N, K):
    x, q, ref = random_case(M, N, K)
    got = getattr(experiment, emulation)(x, q)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("emulation,M,N,K", [("emulate", 1, 16, 2048), ("emulate_ring32", 3, 32, 1024)])
def test_emulation_catches_a_wrong_layout(experiment, monkeypatch, emulation, M, N, K):
    # the test above can fail: the same emulation with the two blocks of each pair's scales swapped is far off
    x, q, ref = random_case(M, N, K)
    real = reference.nested_absmax

    def swapped(*a, **kw):
        return real(*a, **kw).reshape(-1, 2).flip(1).reshape(-1)

    monkeypatch.setattr(experiment.reference, "nested_absmax", swapped)
    got = getattr(experiment, emulation)(x, q)
    assert (got - ref).abs().max() > 1e-3


@pytest.mark.parametrize("tiles", [1, 2, 4])
@pytest.mark.parametrize("n_tiles,n_steps,grid", [(1, 8, 4), (3, 16, 2), (64, 48, 20), (896, 64, 264), (5, 8, 1)])
def test_ring32_schedule_covers_every_tile_and_step_once(experiment, tiles, n_tiles, n_steps, grid):
    # gemv_ring32 with TILES tiles a CTA round: every tile's sum holds each of its steps exactly once, from
    # warps of one CTA (the round's barrier orders their partial sums)
    grid = min(grid, -(-n_tiles // tiles))  # the launcher's grid
    added = experiment.ring32_schedule(n_tiles, n_steps, grid, tiles)
    assert sorted(added) == list(range(n_tiles))
    for tile, items in added.items():
        assert sorted(step for _, _, step in items) == list(range(n_steps)), tile
        assert len({cta for cta, _, _ in items}) == 1, tile
        assert {warp % tiles for _, warp, _ in items} == {tile % tiles}, tile

