"""qlora_ext::swiglu_scaled_dora_backward: the DoRA MLP's SwiGLU backward fused with the two DoRA
scale backwards of the gate and up projections. It promises the bits of the composition it replaces,

    dg, du = swiglu_scaled_backward(dh, gate, up, gate_scale, up_scale)
    dz_gate, dm_gate = dora_scale_backward(dg, gate, gate_scale, gate_inv_norm)
    dz_up, dm_up = dora_scale_backward(du, up, up_scale, up_inv_norm)

on each device (odd widths, row counts that CUDA splits into chunks, strided and misaligned views,
NaN, empty batches, generated cases); and CUDA agrees with the CPU, and both with the plain-PyTorch
reference, within the roundings they differ by. opcheck, and errors that name the bad argument.
"""

from __future__ import annotations

import math

import pytest
import torch

import qlora_ext
from qlora_ext import dora

pytest.importorskip("qlora_ext._C", reason="the compiled extension is not built")

from test_block_ops import DEVICES, DTYPES, EPS32, HAS_CUDA, OPS  # noqa: E402  (the block-op tests' devices and dtypes)
# [2048, 96] and [300, 8]: rows that the CUDA kernel splits into several chunks; 13, 37: no 16-byte vectors.
SHAPES = [(1, 1), (3, 7), (2, 5, 24), (17, 40), (64, 1536), (2048, 96), (300, 8), (9, 13), (4, 37)]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def _shape_id(shape):
    return "x".join(map(str, shape))


def _case(shape, dtype, device="cpu", generator=None):
    """(dh, gate, up, gate_scale, up_scale, gate_inv_norm, up_inv_norm), drawn on the CPU."""
    g, n = generator, shape[-1]
    dh, up = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    gate = 3 * torch.randn(shape, generator=g)  # across SiLU's bend
    scales = [torch.rand(n, generator=g) + 0.5 for _ in range(2)]
    inv_norms = [(torch.rand(n, generator=g) + 0.5).to(device) for _ in range(2)]
    return (*(t.to(device, dtype) for t in (dh, gate, up, *scales)), *inv_norms)


def _every_other(t):
    """A view of t's values at every other element of the last dimension of a wider tensor."""
    return torch.stack((t, torch.zeros_like(t)), -1).flatten(-2)[..., ::2]


def composition(dh, gate, up, gate_scale, up_scale, gate_inv_norm, up_inv_norm):
    dg, du = OPS.swiglu_scaled_backward(dh, gate, up, gate_scale, up_scale)
    dz_gate, dm_gate = OPS.dora_scale_backward(dg, gate, gate_scale, gate_inv_norm)
    dz_up, dm_up = OPS.dora_scale_backward(du, up, up_scale, up_inv_norm)
    return dz_gate, dz_up, dm_gate, dm_up


def assert_bitwise(got, want, what=""):
    for name, a, b in zip(("dz_gate", "dz_up", "dm_gate", "dm_up"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, (what, name, a.dtype, a.shape)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what} {name}: {m}")


def assert_close_with_slack(got, want, dg, z, inv_norm, rel, what):
    """dz within 2·rel of its value (dg's and dz's roundings to the dtype) plus the SwiGLU fp32
    noise that test_block_ops allows (8 ulp of fp32 at the largest value). dm per column within
    Σ_rows |δdg·z|/n, each dg off by rel·|dg| plus that noise, plus fp32 summation-order noise
    (4·eps32·√M of Σ|dg·z|/n, as test_block_ops' rms_sum_slack)."""
    (dz, dm), (want_dz, want_dm) = got, want
    info, n = torch.finfo(dz.dtype), dz.shape[-1]
    sub = info.tiny * info.eps  # the dtype's subnormal spacing
    dg, z, inv = dg.float().abs().reshape(-1, n), z.float().abs().reshape(-1, n), inv_norm.float()
    noise = 8 * EPS32 * (want_dz.float().abs().max().item() if dz.numel() else 0.0)
    torch.testing.assert_close(dz.float(), want_dz.float(), rtol=2 * rel, atol=noise + 2 * sub,
                               msg=lambda m: f"{what} dz: {m}")  # fmt: skip
    dg_noise = 8 * EPS32 * (dg.max().item() if dg.numel() else 0.0) + sub
    bound = (dg * z).sum(0) * inv * (rel + 4 * EPS32 * math.sqrt(max(dg.shape[0], 1))) + dg_noise * z.sum(0) * inv
    err = (dm.float() - want_dm.float()).abs()
    worst = int((err - bound).argmax())
    assert (err <= bound + 1e-30).all(), (f"{what} dm[{worst}]: {dm[worst]} vs {want_dm[worst]}, "
                                          f"|err| {err[worst]:.3g} > {bound[worst]:.3g}")  # fmt: skip


# ---- bit for bit the composition ----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_the_composition_bitwise(shape, dtype, device):
    args = _case(shape, dtype, device)
    out = OPS.swiglu_scaled_dora_backward(*args)
    assert [t.dtype for t in out] == [dtype, dtype, torch.float32, torch.float32]
    assert out[0].shape == out[1].shape == shape and out[2].shape == out[3].shape == (shape[-1],)
    assert_bitwise(out, composition(*args))
    assert_bitwise(dora.swiglu_scaled_dora_backward(*args), out, "dora.swiglu_scaled_dora_backward")
    if device == "cuda":  # CUDA vs CPU: SwiGLU's exp differs by an ulp (test_block_ops' rtol of 4 eps)
        cpu_args = [t.cpu() for t in args]
        cpu = OPS.swiglu_scaled_dora_backward(*cpu_args)
        dg, du = OPS.swiglu_scaled_backward(*cpu_args[:5])
        rel = 2 * torch.finfo(dtype).eps
        for i, (d, z, inv) in enumerate(((dg, cpu_args[1], cpu_args[5]), (du, cpu_args[2], cpu_args[6]))):
            got, want = (out[i].cpu(), out[2 + i].cpu()), (cpu[i], cpu[2 + i])
            assert_close_with_slack(got, want, d, z, inv, rel, "cuda vs cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_strided_and_misaligned_inputs(dtype, device):
    """Views offset by one element (the CUDA kernel's scalar path, not the 16-byte one) and every
    other column of a wider tensor: the composition's bits on the same views, and the op's bits on
    contiguous copies."""
    args = _case((33, 24), dtype, device)
    offset = [torch.cat((t.new_zeros(1), t.flatten()))[1:].view(t.shape) for t in args]
    assert all(t.data_ptr() % 16 for t in offset)
    strided = [_every_other(t) for t in args]
    assert not any(t.is_contiguous() for t in strided)
    want = OPS.swiglu_scaled_dora_backward(*args)
    for views, what in ((offset, "offset by one"), (strided, "strided")):
        got = OPS.swiglu_scaled_dora_backward(*views)
        assert_bitwise(got, composition(*views), what)
        assert_bitwise(got, want, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_nan_in_dh_propagates_as_in_the_composition(dtype, device):
    args = list(_case((40, 24), dtype, device))
    nan_at = torch.rand(40, 24) < 0.05
    nan_at[3, 5] = True
    args[0][nan_at.to(device)] = float("nan")
    out = OPS.swiglu_scaled_dora_backward(*args)
    assert_bitwise(out, composition(*args), "NaN in dh")
    for dz, dm in ((out[0], out[2]), (out[1], out[3])):
        assert dz.isnan().cpu()[nan_at].all() and dm.isnan().cpu()[nan_at.any(0)].all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(0, 6), (3, 0, 6)], ids=["0x6", "3x0x6"])
def test_empty_rows_give_empty_dz_and_zero_dm(shape, dtype, device):
    args = _case(shape, dtype, device)
    for fn in (OPS.swiglu_scaled_dora_backward, dora.swiglu_scaled_dora_backward):
        dz_gate, dz_up, dm_gate, dm_up = fn(*args)
        assert dz_gate.shape == dz_up.shape == shape and dz_gate.dtype == dz_up.dtype == dtype
        assert dz_gate.device == args[0].device
        for dm in (dm_gate, dm_up):
            assert torch.equal(dm, torch.zeros(6, device=device))


# ---- against the plain-PyTorch reference ---------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 24), (300, 8), (2048, 96), (4, 37)], ids=_shape_id)
def test_matches_the_reference(shape, dtype, device):
    """dz within two roundings to the dtype (dg's and dz's) of the reference; dm within the dg
    roundings summed over the rows (see assert_close_with_slack)."""
    args = _case(shape, dtype, device)
    out = dora.swiglu_scaled_dora_backward(*args)
    ref = dora.swiglu_scaled_dora_backward_reference(*args)
    assert len(ref) == 4 and ref[2].dtype == ref[3].dtype == torch.float32
    dg, du = qlora_ext.reference.swiglu_scaled_backward(*args[:5])  # fp32
    rel = torch.finfo(dtype).eps
    assert_close_with_slack((out[0], out[2]), (ref[0], ref[2]), dg, args[1], args[5], rel, "gate")
    assert_close_with_slack((out[1], out[3]), (ref[1], ref[3]), du, args[2], args[6], rel, "up")


# ---- opcheck, errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    cases = (((3, 20), torch.float32), ((2, 3, 9), torch.bfloat16), ((33,), torch.float16), ((0, 8), torch.float32))
    for shape, dtype in cases:
        torch.library.opcheck(OPS.swiglu_scaled_dora_backward.default, _case(shape, dtype, device))


# (case, argument index, how it breaks a valid [4, 8] fp32 case, the argument the error must name)
BAD = [
    ("gate_inv_norm-dtype", 5, lambda t: t.double(), "gate_inv_norm"),
    ("up_inv_norm-dtype", 6, lambda t: t.half(), "up_inv_norm"),
    ("gate_inv_norm-shape", 5, lambda t: t[:7], "gate_inv_norm"),
    ("up_inv_norm-shape", 6, lambda t: t.reshape(2, 4), "up_inv_norm"),
    ("up-shape", 2, lambda t: t[:3], r"\bup\b"),
    ("gate_scale-shape", 3, lambda t: t[:7], "gate_scale"),
    ("up_scale-shape", 4, lambda t: torch.cat((t, t[:1])), "up_scale"),
    ("gate_scale-dtype", 3, lambda t: t.bfloat16(), "gate_scale"),
    ("up_scale-dtype", 4, lambda t: t.half(), "up_scale"),
    ("up-dtype", 2, lambda t: t.half(), r"\bup\b"),
    ("dh-dtype", 0, lambda t: t.bfloat16(), r"\bdh\b"),
    ("dh-shape", 0, lambda t: t[:2], r"\bdh\b"),
    ("dh-0d", 0, lambda t: t[0, 0], r"\bdh\b"),
    ("gate_inv_norm-device", 5, lambda t: t.to("cpu" if t.is_cuda else "cuda"), "gate_inv_norm"),
    ("up_inv_norm-device", 6, lambda t: t.to("cpu" if t.is_cuda else "cuda"), "up_inv_norm"),
    ("up_scale-device", 4, lambda t: t.to("cpu" if t.is_cuda else "cuda"), "up_scale"),
    ("up-device", 2, lambda t: t.to("cpu" if t.is_cuda else "cuda"), r"\bup\b"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("via", ["op", "dora"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_name_the_argument(case, via, device):
    what, index, breaks, name = case
    if what.endswith("-device") and not HAS_CUDA:
        pytest.skip("a device mismatch needs a CUDA build and GPU")
    fn = OPS.swiglu_scaled_dora_backward if via == "op" else dora.swiglu_scaled_dora_backward
    args = list(_case((4, 8), torch.float32, device))
    args[index] = breaks(args[index])
    with pytest.raises((RuntimeError, ValueError), match=name):
        fn(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_unsupported_dtype_is_an_error(device):
    ints = [t.int() for t in _case((4, 8), torch.float32, device)[:5]] + [torch.ones(8, device=device)] * 2
    with pytest.raises(RuntimeError, match="dh|gate"):  # a dtype the kernels lack never reaches them
        OPS.swiglu_scaled_dora_backward(*ints)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA build and GPU")
def test_cuda_kernel_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("qlora_ext::swiglu_scaled_dora_backward", "CUDA")


# ---- generated cases --------------------------------------------------------------------------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # only the generated cases need it
    given = None

DEVICE_NAMES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

if given is None:

    @pytest.mark.skip(reason="needs hypothesis")
    def test_generated_cases_match_the_composition_bitwise():
        pass

else:

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(lead=st.lists(st.integers(0, 70), max_size=2), n=st.integers(1, 200), dtype=st.sampled_from(DTYPES),
           seed=st.integers(0, 2**31 - 1), strided=st.booleans(), device=st.sampled_from(DEVICE_NAMES))  # fmt: skip
    def test_generated_cases_match_the_composition_bitwise(lead, n, dtype, seed, strided, device):
        shape = (*lead, n)
        args = _case(shape, dtype, device, torch.Generator().manual_seed(seed))
        if strided:  # every other element of the last dimension of a wider tensor
            args = [_every_other(t) for t in args]
        out = OPS.swiglu_scaled_dora_backward(*args)
        assert out[0].shape == shape and out[2].shape == (n,)
        assert_bitwise(out, composition(*args), f"{shape} {dtype} strided={strided}")
