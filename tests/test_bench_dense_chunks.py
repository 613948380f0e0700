"""benchmarks/bench_dense_chunks.py: its row slices of an NF4 weight dequantize to exactly the rows of
the whole weight, its chunk bounds start on nested-scale blocks, the chunked product matches the
dense one, and the --tiny mode runs anywhere (CPU without a GPU) with every case correct."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import qlora_ext
from qlora_ext import ops

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_dense_chunks  # noqa: PLC0415

    yield bench_dense_chunks
    sys.modules.pop("bench_dense_chunks", None)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "plain"])
@pytest.mark.parametrize("N,K,chunk_rows", [(96, 512, 32), (70, 256, 64), (33, 1024, 16)])
def test_row_chunks_dequantize_to_the_weights_rows(bench, double_quant, N, K, chunk_rows):
    w = torch.randn(N, K) * 0.05
    q = qlora_ext.NF4Weight.from_float(w, blocksize=64, double_quant=double_quant)
    whole = q.dequantize(torch.bfloat16)
    bounds = bench.chunk_bounds(N, K, chunk_rows, q)
    assert bounds[0][0] == 0 and bounds[-1][1] == N
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no gaps
    for n0, n1 in bounds:
        if double_quant:  # every chunk starts a nested block: its absmax2 slice is its own
            assert (n0 * K // q.blocksize) % q.nested.blocksize == 0
        out = torch.empty(n1 - n0, K, dtype=torch.bfloat16)
        ops.nf4_dequantize_into(out, *bench.row_chunk_args(q, n0, n1))
        torch.testing.assert_close(out, whole[n0:n1], rtol=0, atol=0)


def test_row_chunk_args_refuses_a_misaligned_start(bench):
    q = qlora_ext.NF4Weight.from_float(torch.randn(64, 256), blocksize=64, double_quant=True)
    with pytest.raises(ValueError, match="nested scale block"):
        bench.row_chunk_args(q, 4, 64)  # 4 rows x 4 blocks = 16 blocks, not a multiple of 256


def test_chunked_product_matches_the_dense_one(bench):
    N, K = 200, 512
    q = qlora_ext.NF4Weight.from_float(torch.randn(N, K) * 0.05, blocksize=64, double_quant=True)
    x = torch.randn(7, K, dtype=torch.bfloat16)
    bounds = bench.chunk_bounds(N, K, 64, q)
    buf = torch.empty(max(n1 - n0 for n0, n1 in bounds), K, dtype=torch.bfloat16)
    got = bench.chunked_serial(x, q, buf, bounds)
    # the same products, possibly summed in another order by the BLAS: bf16's default tolerance
    torch.testing.assert_close(got, torch.nn.functional.linear(x, q.dequantize(torch.bfloat16)))


def test_tiny_run_writes_correct_json_lines(bench, tmp_path):
    out = tmp_path / "chunks.jsonl"
    assert bench.main(["--tiny", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cases = {r["case"] for r in rows}
    assert {"bf16_cublas", "dense_route", "dequantize_alone", "cublas_alone_one_buffer"} <= cases
    assert any(c.startswith("chunked_serial_") for c in cases)
    for r in rows:
        assert r["median_us"] > 0
        if "correct" in r:
            assert r["correct"] is True, r
