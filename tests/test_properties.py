"""Property-based tests (hypothesis): every operator against its pure-PyTorch reference on
generated shapes (0, 1 and odd element counts, several dimensions, non-contiguous views), dtypes,
block sizes and hyper-parameters, bitwise where the kernels promise the reference's rounding; and
invalid arguments that must raise an error naming them, never crash or return garbage.

nf4_dequantize_into is checked against nf4_dequantize on the same cases. The NF4 product
(nf4_gemv, nf4_gemm), block (RMSNorm fwd/bwd, RoPE, SwiGLU fwd/bwd), DoRA
(dora_scale, dora_scale_backward, dora_column_scale) and training-layer (nf4_lora_linear,
nf4_dora_linear, with their gradients) operators run their generated cases through
their example tests' own checks (the FlashAttention-rule comparisons, opcheck), so each rule is
stated once. Deterministic (derandomize) and bounded (max_examples) so that CI runs the same
cases quickly."""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qlora_ext import _ops as ops  # noqa: E402
from qlora_ext import codebooks, reference  # noqa: E402
from qlora_ext.optim import ops as optim_ops  # noqa: E402
from qlora_ext.optim import reference as optim_ref  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
PROFILE = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

shapes = st.lists(st.integers(0, 70), min_size=1, max_size=3).map(tuple)
sizes = st.one_of(st.integers(0, 9), st.integers(10, 5000))
nf4_blocks = st.sampled_from(ops.NF4_BLOCKSIZES)
pow2_blocks = st.sampled_from([32, 64, 256, 1024, 4096])


def _weight(shape, dtype, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _view(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """t itself, or a non-contiguous view with t's values (every other element of a larger tensor)."""
    if not strided or t.numel() == 0:
        return t
    big = torch.empty((*t.shape[:-1], t.shape[-1] * 2), dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    view = big[..., ::2]
    assert not view.is_contiguous() or t.shape[-1] <= 1
    return view


@PROFILE
@given(shape=shapes, dtype=st.sampled_from(FLOATS), blocksize=nf4_blocks, seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), strided=st.booleans(), device=st.sampled_from(DEVICES))
def test_nf4_quantize_dequantize_match_the_reference(shape, dtype, blocksize, seed, scale, strided, device):
    w = _weight(shape, dtype, seed, scale)
    packed, absmax = ops.nf4_quantize(_view(w.to(device), strided), blocksize)
    ref_packed, ref_absmax = reference.nf4_quantize(w, blocksize)
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)
    for out_dtype in FLOATS:
        out = ops.nf4_dequantize(packed, absmax, blocksize, list(shape), out_dtype)
        expected = reference.nf4_dequantize(ref_packed, ref_absmax, blocksize, list(shape), out_dtype)
        assert out.shape == torch.Size(shape) and out.dtype == out_dtype
        # nf4_dequantize_into: the same bits in a row range of a larger buffer, the rest untouched
        rows = shape[0] if shape else 1
        buffer = torch.full((rows + 2, *shape[1:]), -1.0, dtype=out_dtype, device=device)
        ops.nf4_dequantize_into(buffer[1 : 1 + rows].view(shape), packed, absmax, blocksize)
        assert torch.equal(buffer[1 : 1 + rows].view(shape), out)
        assert (buffer[0] == -1).all() and (buffer[-1] == -1).all()
        assert torch.equal(out.cpu(), expected)


@PROFILE
@given(n=st.integers(1, 20000), blocksize=nf4_blocks, seed=st.integers(0, 2**31 - 1), device=st.sampled_from(DEVICES))
def test_double_quantization_matches_the_reference(n, blocksize, seed, device):
    w = _weight((n,), torch.bfloat16, seed, 0.02)
    code = codebooks.dynamic_map(True)
    packed, codes, absmax2, offset = ops.nf4_double_quantize(w.to(device), blocksize, code.to(device))
    ref_packed, absmax = reference.nf4_quantize(w, blocksize)
    # The offset is torch's mean on the weight's device (as bitsandbytes takes it), whose summation
    # order differs between devices by an ulp; given the offset, everything else is exact.
    torch.testing.assert_close(offset.cpu(), absmax.mean(), rtol=1e-6, atol=0)
    ref_codes, ref_absmax2 = reference.blockwise8_quantize(absmax - offset.cpu(), code, 256)
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax2.cpu(), ref_absmax2)
    out = ops.nf4_dequantize(packed, codes, blocksize, [n], torch.bfloat16, absmax2, code.to(device), offset.reshape(1))
    expected = reference.nf4_dequantize(ref_packed, ref_codes, blocksize, [n], torch.bfloat16, ref_absmax2, code,
                                        offset.cpu().reshape(1))  # fmt: skip
    assert torch.equal(out.cpu(), expected)


@PROFILE
@given(n=sizes, blocksize=pow2_blocks, seed=st.integers(0, 2**31 - 1), with_offset=st.booleans(),
       signed=st.booleans(), device=st.sampled_from(DEVICES))  # fmt: skip
def test_blockwise8_matches_the_reference(n, blocksize, seed, with_offset, signed, device):
    x = _weight((n,), torch.float32, seed, 1.0)
    if not signed:
        x = x.abs()
    code = codebooks.dynamic_map(signed)
    offset = torch.tensor([0.25]) if with_offset else None
    codes, absmax = ops.blockwise8_quantize(x.to(device), code.to(device), blocksize,
                                            None if offset is None else offset.to(device))  # fmt: skip
    ref_codes, ref_absmax = reference.blockwise8_quantize(x, code, blocksize, offset)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax.cpu(), ref_absmax)
    out = ops.blockwise8_dequantize(codes, absmax, code.to(device), blocksize)
    assert torch.equal(out.cpu(), reference.blockwise8_dequantize(ref_codes, ref_absmax, code, blocksize))


@PROFILE
@given(n=sizes, dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 4),
       lr=st.sampled_from([0.0, 1e-4, 3e-2]), weight_decay=st.sampled_from([0.0, 0.1]),
       grad_scale=st.sampled_from([1.0, 0.37]), device=st.sampled_from(DEVICES))  # fmt: skip
def test_adamw_step_matches_the_reference(n, dtype, seed, steps, lr, weight_decay, grad_scale, device):
    hyper = dict(lr=lr, beta1=0.9, beta2=0.995, eps=1e-8, weight_decay=weight_decay, grad_scale=grad_scale)
    p = _weight((n,), dtype, seed, 1.0)
    p_ref = p.clone()
    p = p.to(device)
    m, v = torch.zeros(n, device=device), torch.zeros(n, device=device)
    m_ref, v_ref = torch.zeros(n), torch.zeros(n)
    for step in range(1, steps + 1):
        g = _weight((n,), dtype, seed + step, 0.1)
        optim_ops.adamw_step(p, g.to(device), m, v, step=step, **hyper)
        optim_ref.adamw_step(p_ref, g, m_ref, v_ref, step=step, **hyper)
    assert torch.equal(p.cpu(), p_ref) and torch.equal(m.cpu(), m_ref) and torch.equal(v.cpu(), v_ref)


@PROFILE
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 3), device=st.sampled_from(DEVICES))
def test_adamw_8bit_step_matches_the_reference(n, seed, steps, device):
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    maps = (codebooks.dynamic_map(True), codebooks.dynamic_map(False))
    blocks = math.ceil(n / 256)
    zero = [int(torch.argmin(mp.abs())) for mp in maps]
    state = [torch.full((n,), zero[0], dtype=torch.uint8), torch.zeros(blocks),
             torch.full((n,), zero[1], dtype=torch.uint8), torch.zeros(blocks)]  # fmt: skip
    state_ref = [t.clone() for t in state]
    state = [t.to(device) for t in state]
    p = _weight((n,), torch.float32, seed, 1.0)
    p_ref = p.clone()
    p = p.to(device)
    for step in range(1, steps + 1):
        g = _weight((n,), torch.float32, seed + step, 0.1)
        optim_ops.adamw_step_8bit([p], [g.to(device)], *([t] for t in state), maps[0].to(device), maps[1].to(device),
                                  step=step, **hyper)  # fmt: skip
        optim_ref.adamw_step_8bit(p_ref, g, *state_ref, *maps, step=step, **hyper)
    assert torch.equal(p.cpu(), p_ref)
    for got, want in zip(state, state_ref):
        assert torch.equal(got.cpu(), want)


# ---- invalid arguments --------------------------------------------------------------------------

BAD_QUANTIZE = st.one_of(
    st.tuples(st.sampled_from([torch.int32, torch.int64, torch.uint8, torch.complex64, torch.float64]),
              st.just(64), st.just("weight")),
    st.tuples(st.just(torch.float32), st.sampled_from([0, 1, 16, 48, 100, 8192, -64]), st.just("blocksize")),
)  # fmt: skip


@PROFILE
@given(case=BAD_QUANTIZE, n=st.integers(1, 300))
def test_invalid_quantize_arguments_raise_naming_them(case, n):
    dtype, blocksize, argument = case
    w = torch.ones(n, dtype=dtype)
    with pytest.raises((TypeError, ValueError, RuntimeError), match=argument):
        ops.nf4_quantize(w, blocksize)


@PROFILE
@given(n=st.integers(1, 5000), blocksize=nf4_blocks, wrong=st.integers(-3, 3).filter(lambda d: d != 0))
def test_dequantize_with_mismatched_sizes_raises(n, blocksize, wrong):
    packed, absmax = ops.nf4_quantize(torch.randn(n), blocksize)
    bad_absmax = torch.ones(max(absmax.numel() + wrong, 0))
    with pytest.raises(RuntimeError, match="absmax"):
        ops.nf4_dequantize(packed, bad_absmax, blocksize, [n], torch.float32)
    with pytest.raises(RuntimeError, match="packed|shape"):
        ops.nf4_dequantize(packed, absmax, blocksize, [n + 2 * abs(wrong)], torch.float32)


@PROFILE
@given(n=st.integers(1, 300), which=st.sampled_from(["grads", "exp_avgs", "exp_avg_sqs"]), delta=st.integers(1, 5))
def test_adamw_with_mismatched_state_raises_naming_it(n, which, delta):
    args = {"params": torch.zeros(n), "grads": torch.zeros(n), "exp_avgs": torch.zeros(n), "exp_avg_sqs": torch.zeros(n)}
    args[which] = torch.zeros(n + delta)
    with pytest.raises(RuntimeError, match=which):
        optim_ops.adamw_step(args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"], lr=1e-3,
                             beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)  # fmt: skip


# ---- the product, block and DoRA operators: generated cases through the same checks as their
# example tests (each check is the example test's own function, so the rules are stated once) ----

import test_block_ops  # noqa: E402
import test_lora_family  # noqa: E402
from test_nf4_gemm import gemm  # noqa: E402
from test_nf4_gemv import assert_close_to_reference, gemv, make_case  # noqa: E402

# K: multiples of 64 (the fused kernels' domain) and others (blocks straddle rows: the fallbacks)
gemv_k = st.one_of(st.integers(1, 48).map(lambda j: 64 * j), st.integers(1, 700))


@PROFILE
@given(M=st.integers(0, 16), N=st.integers(1, 80), K=gemv_k, dtype=st.sampled_from(FLOATS), blocksize=nf4_blocks,
       double_quant=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**31 - 1), device=st.sampled_from(DEVICES))  # fmt: skip
def test_nf4_gemv_matches_the_reference(M, N, K, dtype, blocksize, double_quant, bias, seed, device):
    x, weight, b = make_case(device, dtype, M, N, K, blocksize, double_quant, bias, seed=seed)
    assert_close_to_reference(gemv(x, weight, b), x, weight, b)


@settings(PROFILE, max_examples=12)
@given(M=st.integers(17, 96), N=st.integers(1, 80), K=gemv_k, dtype=st.sampled_from(FLOATS), blocksize=nf4_blocks,
       double_quant=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**31 - 1), device=st.sampled_from(DEVICES))  # fmt: skip
def test_nf4_gemm_matches_the_reference(M, N, K, dtype, blocksize, double_quant, bias, seed, device):
    x, weight, b = make_case(device, dtype, M, N, K, blocksize, double_quant, bias, seed=seed)
    assert_close_to_reference(gemm(x, weight, b), x, weight, b)


rows_shapes = st.tuples(st.lists(st.integers(0, 9), max_size=2), st.integers(1, 1100)).map(lambda t: (*t[0], t[1]))


@PROFILE
@given(shape=rows_shapes, dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1), device=st.sampled_from(DEVICES))
def test_rms_norm_matches_the_reference(shape, dtype, seed, device):
    torch.manual_seed(seed)  # the example test draws its x and weight from torch's generator
    test_block_ops.test_rms_norm_matches_reference(device, dtype, shape)


@settings(PROFILE, max_examples=15)
@given(shape=rows_shapes, dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1), device=st.sampled_from(DEVICES))
def test_rms_norm_backward_matches_the_reference(shape, dtype, seed, device):
    torch.manual_seed(seed)
    test_block_ops.test_rms_norm_gradients(device, dtype, shape)


@PROFILE
@given(B=st.integers(1, 3), Hq=st.integers(1, 5), Hk=st.integers(1, 3), T=st.integers(1, 40),
       Dh=st.integers(1, 40).map(lambda d: 2 * d), layout=st.sampled_from(["bhtd", "bthd"]),
       dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1), device=st.sampled_from(DEVICES))  # fmt: skip
def test_rope_matches_the_reference(B, Hq, Hk, T, Dh, layout, dtype, seed, device):
    torch.manual_seed(seed)
    test_block_ops.test_rope_matches_reference(device, dtype, (B, Hq, Hk, T, Dh), layout)


@PROFILE
@given(shape=rows_shapes, dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1), device=st.sampled_from(DEVICES))
def test_swiglu_matches_the_reference(shape, dtype, seed, device):
    torch.manual_seed(seed)
    test_block_ops.test_swiglu_matches_reference(device, dtype, shape)


@PROFILE
@given(shape=rows_shapes, dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1), device=st.sampled_from(DEVICES))
def test_swiglu_scaled_matches_the_reference(shape, dtype, seed, device):
    torch.manual_seed(seed)
    test_block_ops.test_swiglu_scaled_is_swiglu_of_the_column_scaled_operands(device, dtype, shape)


@PROFILE
@given(n=st.integers(1, 400), r=st.integers(1, 40), dtype=st.sampled_from(FLOATS), device=st.sampled_from(DEVICES),
       gram_kernel=st.booleans())  # fmt: skip
def test_dora_scale_matches_the_reference(n, r, dtype, device, gram_kernel):
    gram = "kernel" if gram_kernel and device == "cuda" else "mm"  # the A·Aᵀ kernel is CUDA's
    test_lora_family.test_dora_scale_matches_reference(n, r, dtype, device, gram)


@PROFILE
@given(rows=st.lists(st.integers(0, 120), min_size=1, max_size=4).filter(lambda rows: sum(rows) > 0),
       r=st.integers(1, 40), dtype=st.sampled_from(FLOATS), device=st.sampled_from(DEVICES),
       gram_kernel=st.booleans())  # fmt: skip
def test_dora_scale_stacked_matches_one_layer_at_a_time(rows, r, dtype, device, gram_kernel):
    gram = "kernel" if gram_kernel and device == "cuda" else "mm"
    test_lora_family.test_dora_scale_stacked_matches_one_layer_at_a_time(rows, r, dtype, device, gram)


# Leading dims of dy / z. At most one of them 0: opcheck's input copy (torch._dynamo's clone_input,
# torch 2.13) computes a negative storage size for shapes like (0, 0, n) and fails before the op
# runs; the operators themselves take them (tests/test_lora_family.py, M0).
dora_lead = st.lists(st.integers(0, 40), min_size=1, max_size=2).filter(lambda d: d.count(0) <= 1).map(tuple)


@PROFILE
@given(lead=dora_lead, n=st.integers(1, 300), dtype=st.sampled_from(FLOATS), device=st.sampled_from(DEVICES))
def test_dora_scale_backward_matches_the_reference(lead, n, dtype, device):
    test_lora_family.test_dora_scale_backward_matches_reference(lead, n, dtype, device)


@PROFILE
@given(lead=dora_lead, n=st.integers(1, 300), bias=st.booleans(), dtype=st.sampled_from(FLOATS),
       device=st.sampled_from(DEVICES))  # fmt: skip
def test_dora_column_scale_matches_the_reference(lead, n, bias, dtype, device):
    test_lora_family.test_dora_column_scale_matches_reference(lead, n, bias, dtype, device)


import test_lora_linear  # noqa: E402

# Leading dims of x, an empty batch (one dim 0; see dora_lead) included.
x_lead = st.lists(st.integers(0, 6), min_size=1, max_size=2).filter(lambda d: d.count(0) <= 1).map(tuple)
lora_shapes = st.tuples(x_lead, st.integers(1, 200), st.integers(1, 70), st.integers(1, 16))  # (lead dims of x, K, N, r)


@settings(PROFILE, max_examples=15)
@given(shape=lora_shapes, dropout_input=st.booleans(), dtype=st.sampled_from(FLOATS), device=st.sampled_from(DEVICES),
       s=st.sampled_from([0.5, 1.0, 1.7]))  # fmt: skip
def test_nf4_lora_linear_matches_the_reference(shape, dropout_input, dtype, device, s):
    """qlora_ext::nf4_lora_linear, forward and every gradient, against autograd through the
    reference (the example test's rule), and opcheck."""
    test_lora_linear.test_matches_reference_autograd(shape, dropout_input, dtype, device, s)
    test_lora_linear.test_opcheck_lora(shape, dtype, device)


@settings(PROFILE, max_examples=15)
@given(k=st.integers(1, 200), n=st.integers(1, 90), r=st.integers(1, 16),
       lead=x_lead, with_x_lora=st.booleans(),
       seed=st.integers(0, 2**31 - 1), device=st.sampled_from(DEVICES))  # fmt: skip
def test_nf4_dora_linear_matches_the_reference(k, n, r, lead, with_x_lora, seed, device):
    """qlora_ext::nf4_dora_linear: forward and the gradients of x, x_lora, A, B, m and bias
    against autograd through the paper's formula (the example test's check)."""
    torch.manual_seed(seed)
    test_lora_family.test_dora_op_gradients_match_reference((k, n, r, lead), with_x_lora, device)
