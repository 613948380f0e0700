"""nf4_gemm's Hopper kernel (cpp/kernels/cuda/nf4_gemm_sm90.cuh) against the fp32 reference.

It runs where `ops.nf4_gemm_sm90_applies`: compute capability 9.0, a build with sm_90a code, bf16 x, blocksize 64,
N % 8 == 0, K % 64 == 0; nf4_gemm takes it from `ops.nf4_gemm_sm90_min_rows()` rows (these tests set 65 and switch
the route on, whatever the defaults). Same tolerance as tests/test_nf4_gemm.py. Elsewhere only the Python side is tested: the route and the switch.
"""

from __future__ import annotations

import math

import pytest
import torch

from qlora_ext import ops
from train_helpers import cuda_kernel_names

from test_nf4_gemm import check_cuda_graph_capture, gemm
from test_nf4_gemv import HAS_CUDA, assert_close_to_reference, make_case, opcheck_op

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")


def _hopper_ready() -> bool:
    if not HAS_CUDA:
        return False
    x, weight, _ = make_case("cuda", torch.bfloat16, 1, 8, 64, bias=False)
    return ops.nf4_gemm_sm90_applies(x, weight)


HOPPER = _hopper_ready()
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU and a build with sm_90a code")
KERNEL = "nf4_gemm_sm90_kernel"


@pytest.fixture(autouse=True)
def _hopper_kernel_on(monkeypatch):
    # These tests check the kernel and its route with both switched on, whatever the defaults.
    monkeypatch.setattr(ops, "NF4_GEMM_SM90_ENABLED", True)
    before = ops.nf4_gemm_sm90_min_rows()
    if before >= 1:
        ops.set_nf4_gemm_sm90_min_rows(65)
    yield
    if before >= 1:
        ops.set_nf4_gemm_sm90_min_rows(before)


@pytest.fixture
def min_rows():
    """Sets nf4_gemm_sm90_min_rows for one test and restores it."""
    before = ops.nf4_gemm_sm90_min_rows()  # 0 in a build without CUDA, where setting it fails
    yield ops.set_nf4_gemm_sm90_min_rows
    if before >= 1:
        ops.set_nf4_gemm_sm90_min_rows(before)


# ---- correctness -------------------------------------------------------------------------------

SHAPES = [  # (N, K): one partial 128-row W tile, several tiles with a partial one, one K stage, long K
    (8, 64),
    (136, 192),
    (1000, 1024),
    (264, 4096),
]


@needs_hopper
@pytest.mark.parametrize("M", [65, 256, 257, 300, 777])
@pytest.mark.parametrize("N,K", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_matches_reference(M, N, K, double_quant, with_bias):
    x, weight, bias = make_case("cuda", torch.bfloat16, M, N, K, 64, double_quant, with_bias)
    assert_close_to_reference(gemm(x, weight, bias), x, weight, bias)


@needs_hopper
def test_large_shape():
    # Many CTAs in both grid dimensions, M not a multiple of the 256-row X tile.
    x, weight, bias = make_case("cuda", torch.bfloat16, 2048 + 40, 4096, 1024)
    assert_close_to_reference(gemm(x, weight, bias), x, weight, bias)


@needs_hopper
@pytest.mark.parametrize("M", [1, 5, 17, 64])
def test_few_rows(min_rows, M):
    # The kernel covers any M; nf4_gemm sends few rows to it when the threshold says so.
    min_rows(1)
    x, weight, bias = make_case("cuda", torch.bfloat16, M, 136, 512)
    assert_close_to_reference(gemm(x, weight, bias), x, weight, bias)


@needs_hopper
def test_leading_dims():
    x, weight, bias = make_case("cuda", torch.bfloat16, 300, 24, 256, x_shape=(3, 100, 256))
    out = gemm(x, weight, bias)
    assert out.shape == (3, 100, 24)
    assert_close_to_reference(out, x, weight, bias)


@needs_hopper
def test_deterministic():
    x, weight, bias = make_case("cuda", torch.bfloat16, 600, 264, 2048)
    assert torch.equal(gemm(x, weight, bias), gemm(x, weight, bias))


@needs_hopper
def test_agrees_with_the_tiled_kernel(min_rows):
    # Both kernels compute the weight exactly and accumulate in fp32; they differ only in summation order.
    x, weight, bias = make_case("cuda", torch.bfloat16, 200, 264, 2048)
    min_rows(65)
    hopper = gemm(x, weight, bias)
    min_rows(10**9)
    tiled = gemm(x, weight, bias)
    assert_close_to_reference(hopper, x, weight, bias)
    assert_close_to_reference(tiled, x, weight, bias)
    scale = tiled.float().abs().max().item()
    assert (hopper.float() - tiled.float()).abs().max().item() <= 2 * torch.finfo(torch.bfloat16).eps * scale


# ---- which kernel runs -------------------------------------------------------------------------


@pytest.mark.not_under_sanitizer  # torch.profiler (CUPTI)
@needs_hopper
def test_takes_the_hopper_kernel_where_it_applies(min_rows):
    # A silent fallback to dequantize + cuBLAS would pass every accuracy test: check the kernel really runs, and
    # that every case outside its domain is served elsewhere, correctly.
    x, weight, bias = make_case("cuda", torch.bfloat16, 300, 264, 1024)
    assert any(KERNEL in n for n in cuda_kernel_names(lambda: gemm(x, weight, bias)))
    min_rows(301)
    assert not any(KERNEL in n for n in cuda_kernel_names(lambda: gemm(x, weight, bias)))
    min_rows(65)
    outside = [
        make_case("cuda", torch.float16, 300, 264, 1024),  # fp16
        make_case("cuda", torch.bfloat16, 300, 264, 1024, blocksize=128),  # blocksize
        make_case("cuda", torch.bfloat16, 300, 260, 1024),  # N % 8 != 0
        make_case("cuda", torch.bfloat16, 300, 264, 1000),  # K % 64 != 0
    ]
    for x, weight, bias in outside:
        assert not any(KERNEL in n for n in cuda_kernel_names(lambda: gemm(x, weight, bias)))
        assert_close_to_reference(gemm(x, weight, bias), x, weight, bias)


@needs_hopper
def test_misaligned_x_takes_another_path():
    x, weight, bias = make_case("cuda", torch.bfloat16, 300, 136, 512)
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    x_off = storage[1:].view_as(x)
    x_off.copy_(x)
    assert_close_to_reference(gemm(x_off, weight, bias), x, weight, bias)
    xt = x.T.contiguous().T  # non-contiguous: the op copies it
    assert_close_to_reference(gemm(xt, weight, bias), x, weight, bias)


@needs_hopper
def test_cuda_graph_capture():
    check_cuda_graph_capture(512, 256, 1024)


@needs_hopper
def test_opcheck():
    opcheck_op(torch.ops.qlora_ext.nf4_gemm.default, "cuda", [
        (torch.bfloat16, 300, 136, 256, 64, True, True, False),
        (torch.bfloat16, 257, 8, 64, 64, False, False, False),
    ])  # fmt: skip


# ---- the route ---------------------------------------------------------------------------------


def filling_n(rows: int) -> int:
    """The fewest W rows (a multiple of 128) whose tiles, at `rows` rows of x, fill the GPU enough for the route."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles_needed = math.ceil(ops.NF4_GEMM_SM90_MIN_SM_FILL * sms)
    return 128 * math.ceil(tiles_needed / math.ceil(rows / 256))


@needs_hopper
def test_linear_forward_routes_batches_that_fill_the_gpu_here(monkeypatch):
    n = filling_n(300)
    x, weight, bias = make_case("cuda", torch.bfloat16, 300, n, 64)
    assert ops.linear_route(x, weight, bias) == ops.ROUTE_GEMM
    assert_close_to_reference(ops.nf4_linear_forward(x, weight, bias), x, weight, bias)
    monkeypatch.setattr(ops, "NF4_GEMM_SM90_ENABLED", False)
    assert ops.linear_route(x, weight, bias) == ops.ROUTE_DENSE
    monkeypatch.setattr(ops, "NF4_GEMM_SM90_ENABLED", True)
    assert ops.linear_route(x.half(), weight, bias.half()) == ops.ROUTE_DENSE
    with torch.enable_grad():
        assert ops.linear_route(x.clone().requires_grad_(True), weight, bias) == ops.ROUTE_DENSE
    # too few tiles (N - 128 rows), too many rows: the dense route
    few, weight_few, _ = make_case("cuda", torch.bfloat16, 300, n - 128, 64)
    assert ops.linear_route(few, weight_few) == ops.ROUTE_DENSE
    many = torch.randn(ops.NF4_GEMM_SM90_ROUTE_MAX_ROWS + 1, 64, device="cuda", dtype=torch.bfloat16)
    assert ops.linear_route(many, weight) == ops.ROUTE_DENSE


@needs_hopper
def test_checkpointed_layers_keep_the_dense_route():
    # A checkpointed layer's first forward runs without a graph; it must leave what its recomputation reuses
    from qlora_ext import checkpointing

    x, weight, bias = make_case("cuda", torch.bfloat16, 300, filling_n(300), 64)
    with torch.no_grad(), checkpointing._in_phase(("forward", 1), {}):
        assert ops.linear_route(x, weight, bias) == ops.ROUTE_DENSE
    with torch.no_grad():
        assert ops.linear_route(x, weight, bias) == ops.ROUTE_GEMM


@needs_hopper
def test_compiled_route():
    x, weight, bias = make_case("cuda", torch.bfloat16, 300, filling_n(300), 64)
    assert ops.linear_route(x, weight, bias) == ops.ROUTE_GEMM

    def f(x, bias):
        return ops.nf4_linear_forward(x, weight, bias) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, bias), f(x, bias))


def test_wins_where_tiles_fill_the_gpu():
    # The route's rule on its own (no GPU needed): past the tiled kernel's rows, at most
    # NF4_GEMM_SM90_ROUTE_MAX_ROWS, and at least NF4_GEMM_SM90_MIN_SM_FILL of the SMs' worth of 128 x 256 tiles.
    sms = 132
    needed = math.ceil(ops.NF4_GEMM_SM90_MIN_SM_FILL * sms)
    rows = 300  # two tiles of x rows
    n_fill = 128 * math.ceil(needed / 2)
    assert ops.nf4_gemm_sm90_wins(rows, n_fill, sms)
    assert not ops.nf4_gemm_sm90_wins(rows, n_fill - 128, sms)
    assert ops.nf4_gemm_sm90_wins(rows, n_fill - 127, sms)  # a partial tile counts
    assert not ops.nf4_gemm_sm90_wins(ops.NF4_GEMM_ROUTE_MAX_ROWS, 10**6, sms)
    assert ops.nf4_gemm_sm90_wins(ops.NF4_GEMM_ROUTE_MAX_ROWS + 1, 10**6, sms)
    assert ops.nf4_gemm_sm90_wins(ops.NF4_GEMM_SM90_ROUTE_MAX_ROWS, 10**6, sms)
    assert not ops.nf4_gemm_sm90_wins(ops.NF4_GEMM_SM90_ROUTE_MAX_ROWS + 1, 10**6, sms)
    assert not ops.nf4_gemm_sm90_wins(rows, n_fill, 2 * sms)


def test_applies_only_to_its_domain():
    # No GPU needed: CPU and meta tensors, fp16, other block sizes are never the Hopper kernel's.
    x, weight, _ = make_case("cpu", torch.bfloat16, 300, 136, 512, bias=False)
    assert not ops.nf4_gemm_sm90_applies(x, weight)
    assert not ops.nf4_gemm_sm90_applies(x.to("meta"), weight)
    assert ops.linear_route(x, weight) == ops.ROUTE_DENSE


def test_outside_checkpointing():
    from qlora_ext import checkpointing

    assert ops.outside_checkpointing()
    for phase in ("forward", "recompute"):
        with checkpointing._in_phase((phase, 1), {}):
            assert not ops.outside_checkpointing()
    assert ops.outside_checkpointing()


def test_min_rows_setting(min_rows):
    if not ops.native().with_cuda:
        with pytest.raises(ValueError, match="no CUDA kernels"):
            ops.set_nf4_gemm_sm90_min_rows(100)
        return
    min_rows(100)
    assert ops.nf4_gemm_sm90_min_rows() == 100
    with pytest.raises(ValueError, match=r"rows must be >= 1, got 0"):
        ops.set_nf4_gemm_sm90_min_rows(0)
    assert ops.nf4_gemm_sm90_min_rows() == 100
