"""benchmarks/gpu_checks/nf4_gemm_sm90_summary.py, which tabulates the Hopper GEMM check's results after a device
call: it must name a failed check, a kernel error and a run that never printed its RESULT line, and put each
speed under its shape and weight placement. (Fed result files written here, in the check's format.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GPU_CHECKS = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_checks"


@pytest.fixture
def summary(monkeypatch):
    monkeypatch.syspath_prepend(str(GPU_CHECKS))
    import nf4_gemm_sm90_summary  # noqa: PLC0415

    yield nf4_gemm_sm90_summary
    sys.modules.pop("nf4_gemm_sm90_summary", None)


def write_result(folder: Path, name: str, records: list[dict], result_line: str | None) -> None:
    lines = ["# device NVIDIA H100 80GB HBM3 (sm_90)", *(json.dumps(r) for r in records), ""]
    if result_line is not None:
        lines.append(result_line)
    (folder / name).write_text("\n".join(lines) + "\n")


def check(correct: bool) -> dict:
    return {"kind": "check", "M": 17, "N": 136, "K": 128, "correct": correct}


def timing(n: int, k: int, weights: str, speed: float) -> dict:
    return {"kind": "time", "M": 2048, "N": n, "K": k, "weights": weights, "speed_vs_bf16": speed}


def test_table_rows_and_cells(tmp_path, summary):
    write_result(tmp_path, "nf4_gemm_sm90_check_h100.json.txt",
                 [check(True), check(True), timing(4096, 4096, "hot", 0.7241), timing(4096, 4096, "rotating", 0.9123)],
                 "RESULT: PASS (2 checks ran, 0 skipped as not covered)")  # fmt: skip
    write_result(tmp_path, "nf4_gemm_sm90_producer_bf16pairs_h100.json.txt", [check(True), check(False)],
                 "RESULT: FAIL (2 checks ran, 0 skipped as not covered)")  # fmt: skip
    write_result(tmp_path, "nf4_gemm_sm90_diag1_h100.json.txt", [timing(4096, 4096, "hot", 0.875)], "RESULT: PASS")
    write_result(tmp_path, "nf4_gemm_sm90_sets3_h100.json.txt",
                 [check(True), {"kind": "error", "M": 1, "N": 8, "K": 64, "error": "cudaErrorIllegalAddress"}], None)
    write_result(tmp_path, "nf4_gemm_sm90_sliced_h100.json.txt", [check(True)], None)  # killed by the timeout
    (tmp_path / "nf4_gemm_sm90_build_sliced.txt").write_text("ptxas info\n")  # not a result file

    table = summary.summarize(tmp_path).splitlines()
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table if line.startswith("| ")}
    assert set(rows) == {"build", "check", "producer_bf16pairs", "diag1", "sets3", "sliced"}
    assert "2/2 pass" in rows["check"] and "0.724 / 0.912" in rows["check"]
    assert "1 FAIL" in rows["producer_bf16pairs"]
    assert "timed only" in rows["diag1"] and "0.875 / -" in rows["diag1"]
    assert "ERROR" in rows["sets3"]
    assert "no RESULT line (1 passed)" in rows["sliced"]  # its checks passed, but it never reached its end


def test_main_writes_the_table(tmp_path, summary, monkeypatch, capsys):
    write_result(tmp_path, "nf4_gemm_sm90_check_h100.json.txt", [check(True), timing(28672, 8192, "hot", 0.638)],
                 "RESULT: PASS")  # fmt: skip
    out = tmp_path / "summary.md"
    monkeypatch.setattr(sys, "argv", ["nf4_gemm_sm90_summary.py", str(tmp_path), "--out", str(out)])
    summary.main()
    assert "28672x8192 hot / rotating" in out.read_text()
    assert out.read_text().strip() == capsys.readouterr().out.strip()
