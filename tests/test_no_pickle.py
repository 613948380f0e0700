"""Nothing in the package can execute code from a file it loads: no pickle anywhere.

A static scan of the package source (a pickle import, torch.load without weights_only=True,
numpy loads with allow_pickle=True), and a run of every load path with torch.load and the pickle
module made to fail."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

import qlora_ext

PACKAGE = Path(qlora_ext.__file__).parent


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            yield node, name, {k.arg: k.value for k in node.keywords}


def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, "the scan must see the package"
    return files


def test_no_pickle_in_the_package_source():
    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name in ("pickle", "cPickle", "dill") for a in node.names):
                problems.append(f"{path.name}:{node.lineno} imports pickle")
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill"):
                problems.append(f"{path.name}:{node.lineno} imports from pickle")
        for node, name, kwargs in _calls(tree):
            if name == "load" and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) == "torch":
                safe = kwargs.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    problems.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            allow = kwargs.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{path.name}:{node.lineno} allow_pickle")
    assert not problems, problems


def test_the_scan_catches_what_it_looks_for(tmp_path):
    # The scanner itself must be able to fail.
    bad = "import pickle\nimport torch\nx = torch.load('f')\nimport numpy as np\nnp.load('f', allow_pickle=True)\n"
    tree = ast.parse(bad)
    names = [name for _, name, _ in _calls(tree)]
    assert names.count("load") == 2
    assert any(isinstance(n, ast.Import) and n.names[0].name == "pickle" for n in ast.walk(tree))


@pytest.fixture
def no_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle-based loading was attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_adapter_round_trip_needs_no_pickle(tmp_path, no_pickle):
    from train_helpers import hf_model, randomize_adapters

    model = hf_model("llama")
    qlora_ext.prepare(model, r=4, verbose=False)
    randomize_adapters(model)
    qlora_ext.save_adapter(model, tmp_path / "adapter")
    fresh = hf_model("llama")
    qlora_ext.prepare(fresh, r=4, verbose=False)
    qlora_ext.load_adapter(fresh, tmp_path / "adapter")
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name


def test_optimizer_state_round_trip_needs_no_pickle(tmp_path, no_pickle):
    # The trainer's checkpoint format for optimizer state: safetensors + JSON.
    import json

    from qlora_ext.finetune import _optimizer_from_files, _optimizer_to_files
    from qlora_ext.io_utils import atomic_save_safetensors, read_safetensors

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5000)) for _ in range(3)]
        return params, qlora_ext.PagedAdamW(params, bits=8)

    params, opt = make()
    for step in range(2):
        for p in params:
            p.grad = torch.full_like(p, 0.01 * (step + 1))
        opt.step()
    tensors, meta = _optimizer_to_files(opt)
    atomic_save_safetensors(tmp_path / "opt.safetensors", tensors)
    (tmp_path / "opt.json").write_text(json.dumps(meta))
    params2, opt2 = make()
    with torch.no_grad():
        for p, q in zip(params, params2):
            q.copy_(p)
    _optimizer_from_files(opt2, read_safetensors(tmp_path / "opt.safetensors"), json.loads((tmp_path / "opt.json").read_text()))
    for ps, o in ((params, opt), (params2, opt2)):
        for p in ps:
            p.grad = torch.full_like(p, 0.05)
        o.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
