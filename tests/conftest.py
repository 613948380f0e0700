"""Shared fixtures: the devices to run on, and a fresh, reproducible random stream per test.

Every test gets its own seed (derived from its node id, or from QLORA_TEST_SEED when set), so
inputs differ between tests, a failure reruns identically, and the seed is printed on failure.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import qlora_ext

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NF4_BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_id(shape) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device the tests can run on: cpu, and cuda when a GPU is present."""
    return request.param


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Seeds torch's global generators for this test; returns the seed."""
    base = os.environ.get("QLORA_TEST_SEED")
    value = zlib.crc32(request.node.nodeid.encode()) if base is None else int(base)
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"rerun with QLORA_TEST_SEED={seeds[0]}"))


@pytest.fixture(scope="session")
def build_info() -> dict:
    return qlora_ext.build_info()

