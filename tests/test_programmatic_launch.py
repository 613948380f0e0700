"""Programmatic dependent launch (qlora_ext.ops.programmatic_launch; cpp/kernels/cuda/dependent_launch.cuh):
the switch, and on the GPU a decode-like chain of the kernels that launch with it (RMSNorm, the NF4
GEMV, grouped and single, SwiGLU, rope_append_kv_), eager and captured in a CUDA graph, whose every
output must equal, bit for bit, the same chain launched plainly. A kernel that read its input or
wrote its output before waiting for the kernel before it would race there: the inputs of each
step are rewritten in place right before it, and the intermediate buffers are reallocated (the
caching allocator hands the last step's memory to the next)."""

from __future__ import annotations

import pytest
import torch

import qlora_ext
from qlora_ext import block_ops, ops

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")
HAS_CUDA = torch.cuda.is_available() and qlora_ext.build_info()["with_cuda"]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")


def test_switch_is_scoped():
    assert not ops.programmatic_launch_enabled()  # off by default
    with ops.programmatic_launch():
        assert ops.programmatic_launch_enabled() == qlora_ext.build_info()["with_cuda"]
        with ops.programmatic_launch(False):
            assert not ops.programmatic_launch_enabled()
        assert ops.programmatic_launch_enabled() == qlora_ext.build_info()["with_cuda"]
    assert not ops.programmatic_launch_enabled()
    with pytest.raises(RuntimeError, match="inside"):
        with ops.programmatic_launch():
            raise RuntimeError("inside")
    assert not ops.programmatic_launch_enabled()  # restored on the way out of an error too


class Chain:
    """One decode-like step: norm -> q/k/v (one grouped GEMV) -> rope + cache append -> o GEMV ->
    norm -> gate/up (grouped) -> SwiGLU -> down GEMV. Hidden 256, 4 heads of 32 (2 K/V heads),
    intermediate 704: every GEMV grid has more CTAs than a few, and the o/down GEMVs read what
    the kernel right before them wrote."""

    def __init__(self, device="cuda", dtype=torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        D, H, Hk, Dh, inter, L = 256, 4, 2, 32, 704, 16
        self.shape = (D, H, Hk, Dh, L)

        def nf4(n, k):
            return qlora_ext.NF4Weight.from_float((torch.randn(n, k, generator=gen) * 0.05).to(device))

        self.q, self.k, self.v, self.o = nf4(H * Dh, D), nf4(Hk * Dh, D), nf4(Hk * Dh, D), nf4(D, H * Dh)
        self.gate, self.up, self.down = nf4(inter, D), nf4(inter, D), nf4(D, inter)
        self.norm_weight = (1 + 0.1 * torch.randn(D, generator=gen)).to(device, dtype)
        positions = torch.arange(L, dtype=torch.float32)[:, None] / 10000 ** (torch.arange(0, Dh, 2) / Dh)
        emb = torch.cat([positions, positions], dim=-1)
        self.cos_all, self.sin_all = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
        self.keys = torch.zeros(1, Hk, L, Dh, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.length = torch.zeros((), dtype=torch.int64, device=device)
        self.x = torch.randn(1, D, generator=gen).to(device, dtype)
        self.cos = self.cos_all[:1].clone()[None]
        self.sin = self.sin_all[:1].clone()[None]

    def step(self):
        D, H, Hk, Dh, _ = self.shape
        h = block_ops.rms_norm(self.x, self.norm_weight)
        qkv = ops.nf4_gemv_grouped_weights(h, [self.q, self.k, self.v])
        q, k, v = qkv.split([H * Dh, Hk * Dh, Hk * Dh], dim=-1)
        q = q.view(1, 1, H, Dh).transpose(1, 2)
        k = k.view(1, 1, Hk, Dh).transpose(1, 2)
        v = v.view(1, 1, Hk, Dh).transpose(1, 2)
        block_ops.rope_append_kv_(q, k, v, self.cos, self.sin, self.keys, self.values, self.length)
        attended = torch.cat([q.reshape(1, H * Dh)], dim=-1)  # (stands in for attention: a plain copy)
        out = ops.nf4_gemv_weight(attended, self.o) + self.x
        h2 = block_ops.rms_norm(out, self.norm_weight)
        gate, up = ops.nf4_gemv_grouped_weights(h2, [self.gate, self.up]).chunk(2, dim=-1)
        y = ops.nf4_gemv_weight(block_ops.swiglu(gate, up), self.down)
        self.x.copy_(y + out)  # the next step's input, rewritten in place
        return y

    def state(self):
        return [t.clone() for t in (self.x, self.keys, self.values, self.length)]


def run_chain(pdl: bool, graph: bool, steps: int = 6):
    chain = Chain()
    outputs = []
    with ops.programmatic_launch(pdl), torch.inference_mode():
        if not graph:
            for _ in range(steps):
                outputs.append(chain.step().clone())
        else:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                chain.step()  # warm-up (allocator, cuBLAS) outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = chain.step()
            for _ in range(steps - 1):
                g.replay()
                outputs.append(y.clone())
    torch.cuda.synchronize()
    return outputs, chain.state()


@requires_cuda
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_chain_equals_plain_launches(graph):
    plain, plain_state = run_chain(pdl=False, graph=graph)
    with_pdl, pdl_state = run_chain(pdl=True, graph=graph)
    assert len(plain) == len(with_pdl) > 0
    for step, (a, b) in enumerate(zip(with_pdl, plain)):
        assert torch.equal(a, b), step
    for a, b in zip(pdl_state, plain_state):
        assert torch.equal(a, b)
    assert int(pdl_state[3]) == 6  # every step appended once (graph: the warm-up step and 5 replays)


@requires_cuda
def test_generate_is_the_same_with_and_without(monkeypatch):
    from train_helpers import VOCAB, prepared_hf

    from qlora_ext import generation

    model = prepared_hf("llama", "merged", torch.bfloat16, "cuda")
    prompt = torch.randint(0, VOCAB, (2, 5), device="cuda")
    with_pdl = qlora_ext.generate(model, prompt, max_new_tokens=12)
    monkeypatch.setattr(generation, "PROGRAMMATIC_LAUNCH", False)
    plain = qlora_ext.generate(model, prompt, max_new_tokens=12)
    assert torch.equal(with_pdl, plain)
    assert not ops.programmatic_launch_enabled()  # generate put the switch back


@requires_cuda
@pytest.mark.parametrize("variant", ["ring", "ring32"])
def test_ring_gemv_reads_the_x_the_kernel_before_wrote(variant):
    # The ring kernels read their weights before dependency_wait and x only after it (ring32 loads its
    # first x right after the wait; in session 26 ptxas hoisted an __ldg of it above the wait, hence
    # load_x_ordered). Each GEMV here reads the RMSNorm written right before it and feeds the next norm;
    # with programmatic launch every output must equal the plain launches' bit for bit. (Chain above
    # never takes the rings: its grouped and SwiGLU launches take factored_fill's kernels, its other K
    # lie outside the rings' domains, and "auto" runs factored_fill under programmatic launch.)
    gen = torch.Generator().manual_seed(1)
    D = 1024  # K % 256 == 0 (the ring's domain), 64 tiles
    weight = qlora_ext.NF4Weight.from_float((torch.randn(D, D, generator=gen) * 0.05).cuda())
    norm_weight = (1 + 0.1 * torch.randn(D, generator=gen)).cuda().to(torch.bfloat16)
    x0 = torch.randn(1, D, generator=gen).cuda().to(torch.bfloat16)

    def chain(pdl):
        x, outputs = x0.clone(), []
        with ops.programmatic_launch(pdl), torch.inference_mode():
            for _ in range(8):
                x = ops.nf4_gemv_weight(block_ops.rms_norm(x, norm_weight), weight)
                outputs.append(x)
        torch.cuda.synchronize()
        return outputs

    before = ops.nf4_gemv_variant()
    ops.set_nf4_gemv_variant(variant)
    try:
        plain, with_pdl = chain(False), chain(True)
    finally:
        ops.set_nf4_gemv_variant(before)
    assert len(plain) == len(with_pdl) == 8
    assert not torch.equal(plain[0], plain[1])  # the steps differ, so a stale x would show
    for step, (a, b) in enumerate(zip(with_pdl, plain)):
        assert torch.equal(a, b), step
