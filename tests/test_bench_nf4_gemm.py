"""Smoke test of benchmarks/bench_nf4_gemm.py: its --tiny mode runs anywhere (CPU without a GPU)
and writes one correct JSON line per case, each naming the route it took."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_tiny_run_writes_json_lines(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_nf4_gemm  # noqa: PLC0415

    out = tmp_path / "gemm.jsonl"
    assert bench_nf4_gemm.main(["--tiny", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["M"] for r in rows] == bench_nf4_gemm.TINY_M
    routes = {"nf4_gemv", "nf4_gemm", "dequantize + linear"}
    for r in rows:
        assert r["correct"] is True
        assert r["route"] in routes
        assert r["median_us"] > 0 and r["bf16_cublas_us"] > 0
    sys.modules.pop("bench_nf4_gemm", None)
