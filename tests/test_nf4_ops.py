"""NF4 and 8-bit blockwise operators (issue 2): exact agreement with the pure-PyTorch references,
hand-computed format facts (DESIGN.md §3), torch.library contracts, errors, and NF4Weight.

The kernels round exactly like the references (no fast-math on CUDA), so every comparison with a
reference is bitwise: `torch.equal`, never a tolerance.
"""

from __future__ import annotations

import json
import re
import math

import pytest
import torch

import qlora_ext
from qlora_ext import NF4Weight, codebooks, ops, reference
from conftest import (
    DEVICES,
    FLOAT_DTYPES,
    NF4_BLOCKSIZES,
    dtype_id,
    requires_cuda,
    shape_id,
)

# Odd sizes on purpose: 0 and 1 element, a 0-d tensor, n odd (padding nibble), n not a multiple
# of any block size, exactly one block, 3-D, and sizes just around 4096.
SHAPES = [(0,), (1,), (), (2,), (31,), (33,), (64,), (4095,), (4097,), (7, 129), (3, 5, 67), (128, 256)]
DQ_SHAPES = [(1,), (33,), (4097,), (7, 129), (3, 5, 67), (300, 1000)]  # up to > 256 nested blocks


def random_weight(shape, dtype, device="cpu") -> torch.Tensor:
    """Normal values whose scale drifts every 97 elements (not aligned with any block), so blocks
    have very different absmax; drawn on the CPU so every device sees the same values."""
    n = math.prod(shape)
    scale = torch.exp(2 * torch.randn(n // 97 + 1)).repeat_interleave(97)[:n]
    return (torch.randn(n) * scale).reshape(shape).to(dtype).to(device)


def random_nf4_state(n: int, blocksize: int, nested: bool, device="cpu") -> dict:
    """Arbitrary codes and scales (every code value, every 8-bit absmax code) for dequantize."""
    n_blocks = -(-n // blocksize)
    state = {"packed": torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8)}
    if nested:
        state["absmax"] = torch.randint(0, 256, (n_blocks,), dtype=torch.uint8)
        state["nested_absmax"] = torch.rand(-(-n_blocks // 256)) * 3
        state["nested_code"] = codebooks.dynamic_map(signed=True)
        state["nested_offset"] = torch.rand(1) + 0.5
    else:
        state["absmax"] = torch.rand(n_blocks) * 10
    return {k: v.to(device) for k, v in state.items()}


def dequantize_state(state: dict, blocksize: int, shape, dtype) -> torch.Tensor:
    return ops.nf4_dequantize(
        state["packed"], state["absmax"], blocksize, shape, dtype,
        state.get("nested_absmax"), state.get("nested_code"), state.get("nested_offset"),
    )  # fmt: skip


def reference_dequantize_state(state: dict, blocksize: int, shape, dtype) -> torch.Tensor:
    cpu = {k: v.cpu() for k, v in state.items()}
    return reference.nf4_dequantize(
        cpu["packed"], cpu["absmax"], blocksize, shape, dtype,
        cpu.get("nested_absmax"), cpu.get("nested_code"), cpu.get("nested_offset"),
    )  # fmt: skip


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits (NaN payloads included) — no tolerance."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.detach().cpu().contiguous(), expected.detach().cpu().contiguous()
    if a.is_floating_point():
        bits = {4: torch.int32, 2: torch.int16}[a.element_size()]
        a, e = a.view(bits), e.view(bits)
    mismatch = a != e
    assert not mismatch.any(), f"{int(mismatch.sum())} of {a.numel()} elements differ, first at flat index {int(mismatch.reshape(-1).nonzero()[0])}"


# ---- the format, by hand (guards against the reference and kernels sharing one mistake) -----


def test_nf4_codebook_is_the_design_table():
    design = [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]  # fmt: skip
    assert torch.equal(codebooks.nf4_code(), torch.tensor(design, dtype=torch.float32))


def test_dynamic_map_shape_and_landmarks():
    code = codebooks.dynamic_map(signed=True)
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert bool((code[1:] >= code[:-1]).all()), "sorted ascending"
    assert code[127].item() == 0.0 and code[255].item() == 1.0
    assert code[0].item() == pytest.approx(-0.99296874, abs=1e-8)


def test_quantize_packs_even_element_in_high_nibble(device):
    # absmax 1.0 makes the scale exactly 1, so each value is one code of the table.
    code = codebooks.NF4_CODE
    values = [code[15], code[0], code[3], code[12], code[7], code[9], 0.3]  # n = 7: odd
    packed, absmax = ops.nf4_quantize(torch.tensor(values, device=device), 32)
    # 0.3 is nearest to code 11 (0.3379); the missing 8th element pads with code 7 (0.0).
    assert packed.cpu().reshape(-1).tolist() == [0xF0, 0x3C, 0x79, 0xB7]
    assert packed.shape == (4, 1) and absmax.cpu().tolist() == [1.0]


def test_dequantize_reads_high_nibble_first(device):
    packed = torch.tensor([[0xF0], [0x7E]], dtype=torch.uint8, device=device)
    out = ops.nf4_dequantize(packed, torch.tensor([2.0], device=device), 64, [3], torch.float32)
    assert out.cpu().tolist() == [2.0, -2.0, 0.0]


def test_values_on_a_midpoint_take_the_lower_code(device):
    code = codebooks.nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2  # fp32, as DESIGN.md §3 defines them
    just_above = torch.nextafter(midpoints, torch.tensor(2.0))
    # 1.0 first: absmax 1, so x * (1/absmax) is x exactly and the tie is a real tie.
    values = torch.cat([torch.tensor([1.0]), midpoints, just_above, torch.zeros(1)])
    packed, _ = ops.nf4_quantize(values.to(device), 32)
    flat = packed.cpu().reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[: values.numel()]
    expected = [15] + list(range(15)) + list(range(1, 16)) + [7]
    assert codes.tolist() == expected


def test_values_at_lookup_cell_edges_match_the_reference(device):
    # The kernels find a code in O(1) through 32 cells of width 1/16 over [-1, 1]; values on and
    # one ulp either side of every cell edge (and of +-1) must still take the nearest code.
    edges = torch.arange(33, dtype=torch.float32) / 16 - 1
    near = torch.cat([edges, torch.nextafter(edges, torch.tensor(2.0)), torch.nextafter(edges, torch.tensor(-2.0))])
    near = near.clamp(-1, 1)
    values = torch.cat([torch.tensor([1.0]), near])  # absmax 1: x * (1/absmax) is x exactly
    packed, _ = ops.nf4_quantize(values.to(device), 4096)
    expected, _ = reference.nf4_quantize(values, 4096)
    assert_bitwise_equal(packed.cpu(), expected)


def test_all_zero_block_stores_code_of_zero(device):
    weight = torch.zeros(200, device=device)
    weight[64:128] = torch.randn(64, device=device)
    packed, absmax = ops.nf4_quantize(weight, 64)
    assert absmax[0].item() == 0.0 and absmax[2].item() == 0.0
    flat = packed.cpu().reshape(-1)
    assert bool((flat[:32] == 0x77).all()) and bool((flat[64:] == 0x77).all())
    out = ops.nf4_dequantize(packed, absmax, 64, [200], torch.float32)
    assert bool((out[:64] == 0).all()) and bool((out[128:] == 0).all())


# ---- agreement with the references ----------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("blocksize", NF4_BLOCKSIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_nf4_quantize_matches_reference(device, dtype, blocksize, shape):
    weight = random_weight(shape, dtype)
    packed, absmax = ops.nf4_quantize(weight.to(device), blocksize)
    assert packed.device.type == device and absmax.device.type == device
    expected_packed, expected_absmax = reference.nf4_quantize(weight, blocksize)
    assert_bitwise_equal(packed, expected_packed)
    assert_bitwise_equal(absmax, expected_absmax)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("blocksize", NF4_BLOCKSIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_nf4_dequantize_matches_reference(device, dtype, blocksize, shape, nested):
    state = random_nf4_state(math.prod(shape), blocksize, nested, device)
    out = dequantize_state(state, blocksize, shape, dtype)
    assert out.device.type == device
    assert_bitwise_equal(out, reference_dequantize_state(state, blocksize, shape, dtype))


def dequantize_state_into(out: torch.Tensor, state: dict, blocksize: int) -> torch.Tensor:
    return ops.nf4_dequantize_into(
        out, state["packed"], state["absmax"], blocksize,
        state.get("nested_absmax"), state.get("nested_code"), state.get("nested_offset"),
    )  # fmt: skip


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("shape", [(0,), (1,), (33,), (7, 129), (3, 5, 67), (128, 256)], ids=shape_id)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_nf4_dequantize_into_matches_reference(device, dtype, blocksize, shape, nested):
    """Into a row range of a larger buffer: the range gets nf4_dequantize's bits, the rest of the
    buffer is untouched; opcheck (a mutating operator: schema, fake, autograd registration)."""
    state = random_nf4_state(math.prod(shape), blocksize, nested, device)
    rows = shape[0] if shape else 1
    buffer = torch.full((rows + 5, *shape[1:]), 7.0, dtype=dtype, device=device)
    piece = buffer[2 : 2 + rows].view(shape)
    assert dequantize_state_into(piece, state, blocksize) is piece
    assert_bitwise_equal(piece, reference_dequantize_state(state, blocksize, shape, dtype))
    assert (buffer[:2] == 7).all() and (buffer[2 + rows :] == 7).all()
    args = (piece, state["packed"], state["absmax"], blocksize,
            state.get("nested_absmax"), state.get("nested_code"), state.get("nested_offset"), 256)  # fmt: skip
    torch.library.opcheck(torch.ops.qlora_ext.nf4_dequantize_into.default, args)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("shape, columns, first", [
    ((48, 64), 80, 0),       # [W | B]: the vector path, rows 80 apart
    ((48, 64), 96, 16),      # [B | W | B']: W starts 16 columns in (32 bytes: still aligned)
    ((300, 1024), 1048, 24), # several CTAs, a row stride of 1048
    ((7, 129), 140, 5),      # odd K and an unaligned start: the scalar path
    ((5, 64), 67, 3),        # a stride that is not a whole number of 16-byte segments
    ((0, 64), 80, 0),        # no rows
], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_nf4_dequantize_into_rows_of_a_wider_matrix(device, dtype, blocksize, shape, columns, first, nested):
    """out = buffer[:, first : first + K]: W's rows land in their columns of each buffer row, with
    nf4_dequantize's bits; the other columns are untouched; opcheck."""
    state = random_nf4_state(math.prod(shape), blocksize, nested, device)
    n_rows, k = shape
    buffer = torch.full((n_rows, columns), 7.0, dtype=dtype, device=device)
    piece = buffer[:, first : first + k]
    assert not piece.is_contiguous() or n_rows <= 1
    assert dequantize_state_into(piece, state, blocksize) is piece
    assert_bitwise_equal(piece, reference_dequantize_state(state, blocksize, shape, dtype))
    assert (buffer[:, :first] == 7).all() and (buffer[:, first + k :] == 7).all()
    args = (piece, state["packed"], state["absmax"], blocksize,
            state.get("nested_absmax"), state.get("nested_code"), state.get("nested_offset"), 256)  # fmt: skip
    torch.library.opcheck(torch.ops.qlora_ext.nf4_dequantize_into.default, args)


def test_nf4_dequantize_into_bad_out(device):
    state = random_nf4_state(64, 64, False, device)
    packed, absmax = state["packed"], state["absmax"]
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        ops.nf4_dequantize_into(torch.empty(16, 8, device=device).t(), packed, absmax, 64)
    with pytest.raises(RuntimeError, match="out must be contiguous, or 2-D"):  # rows, but 3-D
        ops.nf4_dequantize_into(torch.empty(2, 4, 10, device=device)[:, :, :8], packed, absmax, 64)
    with pytest.raises(RuntimeError, match="out must be"):
        ops.nf4_dequantize_into(torch.empty(8, 8, dtype=torch.int32, device=device), packed, absmax, 64)
    with pytest.raises(RuntimeError, match="packed"):  # 65 elements need 33 bytes of codes
        ops.nf4_dequantize_into(torch.empty(65, device=device), packed, absmax, 64)
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="out is on"):
            ops.nf4_dequantize_into(torch.empty(64, device="cuda"), packed, absmax, 64)


@pytest.mark.parametrize("shape", DQ_SHAPES, ids=shape_id)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_double_quantized_weight_matches_reference(device, dtype, blocksize, shape):
    weight = random_weight(shape, dtype)
    q = NF4Weight.from_float(weight.to(device), blocksize=blocksize, double_quant=True)
    # The nested state is the reference's 8-bit quantization of (absmax - mean(absmax)).
    packed, absmax = reference.nf4_quantize(weight, blocksize)
    # The offset is torch.mean on the weight's device (as in bitsandbytes): its rounding depends on
    # the device's reduction order, so the reference takes it there too.
    offset = absmax.to(device).mean().cpu()
    codes, absmax2 = reference.blockwise8_quantize(absmax - offset, codebooks.dynamic_map(), 256)
    assert_bitwise_equal(q.packed, packed)
    assert_bitwise_equal(q.absmax, codes)
    assert_bitwise_equal(q.nested.absmax2, absmax2)
    assert q.nested.offset.item() == offset.item()
    expected = reference.nf4_dequantize(
        packed, codes, blocksize, shape, dtype, absmax2, codebooks.dynamic_map(), offset.reshape(1)
    )
    assert_bitwise_equal(q.dequantize(), expected)


@pytest.mark.parametrize("shape", [(1,), (255,), (256,), (3, 1000), (70000,)], ids=shape_id)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_blockwise8_matches_reference(device, blocksize, shape):
    x = random_weight(shape, torch.float32)
    for code in (codebooks.dynamic_map(signed=True), torch.sort(torch.rand(256) * 2 - 1).values):
        codes, absmax = ops.blockwise8_quantize(x.to(device), code.to(device), blocksize)
        expected_codes, expected_absmax = reference.blockwise8_quantize(x, code, blocksize)
        assert_bitwise_equal(codes, expected_codes)
        assert_bitwise_equal(absmax, expected_absmax)
        out = ops.blockwise8_dequantize(codes, absmax, code.to(device), blocksize)
        assert_bitwise_equal(out, reference.blockwise8_dequantize(expected_codes, expected_absmax, code, blocksize))


@pytest.mark.parametrize("shape", [(1,), (300,), (3, 1000)], ids=shape_id)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_blockwise8_offset_is_subtracted_first(device, blocksize, shape):
    # Double quantization centres the absmax vector on its mean inside the kernel: the result must
    # be bitwise that of quantizing the torch difference x - offset.
    x = random_weight(shape, torch.float32).abs() + 0.5
    offset = x.mean().reshape(1)
    code = codebooks.dynamic_map(signed=True)
    codes, absmax = ops.blockwise8_quantize(x.to(device), code.to(device), blocksize, offset.to(device))
    expected_codes, expected_absmax = reference.blockwise8_quantize(x - offset, code, blocksize)
    assert_bitwise_equal(codes, expected_codes)
    assert_bitwise_equal(absmax, expected_absmax)
    ref_codes, ref_absmax = reference.blockwise8_quantize(x, code, blocksize, offset)
    assert_bitwise_equal(ref_codes, expected_codes)
    assert_bitwise_equal(ref_absmax, expected_absmax)


NONCONTIGUOUS_VIEWS = {
    "transposed": lambda w: w.t(),
    "column_stride_2": lambda w: w[:, ::2],
    "row_and_column_slice": lambda w: w[3:40, 1:],
    "expanded_row": lambda w: w[5:6].expand(9, -1),
    "permuted_3d": lambda w: w.reshape(6, 10, 22).permute(2, 0, 1),
}


@pytest.mark.parametrize("view", list(NONCONTIGUOUS_VIEWS), ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_quantize_noncontiguous_weight(device, dtype, view):
    base = random_weight((60, 22), dtype, device)
    weight = NONCONTIGUOUS_VIEWS[view](base)
    assert not weight.is_contiguous()
    packed, absmax = ops.nf4_quantize(weight, 64)
    expected_packed, expected_absmax = reference.nf4_quantize(weight.cpu().contiguous(), 64)
    assert_bitwise_equal(packed, expected_packed)
    assert_bitwise_equal(absmax, expected_absmax)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double_quant"])
def test_dequantize_noncontiguous_state(device, nested):
    shape, blocksize = (300, 70), 32  # 657 blocks: 3 nested blocks
    state = random_nf4_state(math.prod(shape), blocksize, nested, device)
    # Each tensor as every second element of a twice-as-large one: same values, stride 2.
    def strided_copy(t):
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]

    keys = ["packed", "absmax"] + (["nested_absmax"] if nested else [])
    strided = {key: strided_copy(state[key]) for key in keys}
    assert all(not t.is_contiguous() for t in strided.values())
    noncontiguous_state = {**state, **strided}
    for key in strided:
        assert torch.equal(noncontiguous_state[key], state[key])
    out = dequantize_state(noncontiguous_state, blocksize, shape, torch.bfloat16)
    assert_bitwise_equal(out, reference_dequantize_state(state, blocksize, shape, torch.bfloat16))


def test_ten_million_elements(device):
    # 10,002,500 elements: odd, and not a multiple of the block; double-quantized like storage.
    shape = (2500, 4001)
    weight = torch.randn(shape, dtype=torch.bfloat16)
    q = NF4Weight.from_float(weight.to(device), blocksize=64, double_quant=True)
    packed, absmax = reference.nf4_quantize(weight, 64)
    assert_bitwise_equal(q.packed, packed)
    offset = absmax.to(device).mean().cpu()  # device-dependent rounding, as in bitsandbytes
    codes, absmax2 = reference.blockwise8_quantize(absmax - offset, codebooks.dynamic_map(), 256)
    assert_bitwise_equal(q.absmax, codes)
    assert_bitwise_equal(q.nested.absmax2, absmax2)
    expected = reference.nf4_dequantize(
        packed, codes, 64, shape, torch.bfloat16, absmax2, codebooks.dynamic_map(), offset.reshape(1)
    )
    assert_bitwise_equal(q.dequantize(), expected)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_round_trip_error_of_normal_weights(device, double_quant):
    # QLoRA's accuracy claim in numbers: measured 0.07286 mean abs / 0.0921 relative Frobenius
    # (bitsandbytes' own test bound for NF4 at block 64 is mean abs < 0.073316).
    weight = torch.randn(1024, 1024, device=device)
    q = NF4Weight.from_float(weight, blocksize=64, double_quant=double_quant)
    error = q.dequantize() - weight
    assert error.abs().mean().item() < 0.0734
    assert 0.085 <= (error.norm() / weight.norm()).item() <= 0.10


# ---- NaN / Inf -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_nonfinite_block_gets_nonfinite_absmax(device, dtype, bad_value):
    # Documented raw-op behaviour (ops.nf4_quantize): the block holding the value gets absmax NaN
    # (NaN) or +inf (±inf); every other block is quantized as if nothing happened.
    weight = random_weight((5 * 64 + 10,), dtype)
    for position in (70, 5 * 64 + 3):  # a full block and the last, partial one
        bad = weight.clone()
        bad[position] = bad_value
        packed, absmax = ops.nf4_quantize(bad.to(device), 64)
        block = position // 64
        if math.isnan(bad_value):
            assert math.isnan(absmax[block].item())
        else:
            assert absmax[block].item() == math.inf
        expected_packed, expected_absmax = reference.nf4_quantize(weight, 64)
        others = torch.arange(absmax.numel()) != block
        assert_bitwise_equal(absmax.cpu()[others], expected_absmax[others])
        bytes_of_others = others.repeat_interleave(32)[: packed.shape[0]]
        assert_bitwise_equal(packed.cpu()[bytes_of_others], expected_packed[bytes_of_others])


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_from_float_rejects_nonfinite_weight(device, bad_value):
    weight = torch.randn(10, 100, device=device, dtype=torch.bfloat16)
    weight[9, 99] = bad_value
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        NF4Weight.from_float(weight)


# ---- torch.library contracts ------------------------------------------------------------------


def opcheck_samples(device):
    """(operator, args) pairs that cover every op, dtype, scale form and odd sizes."""
    samples = []
    for shape, dtype, blocksize in [((33, 70), torch.float32, 64), ((4097,), torch.bfloat16, 32),
                                    ((2, 3, 128), torch.float16, 4096), ((1,), torch.float32, 64)]:  # fmt: skip
        samples.append((torch.ops.qlora_ext.nf4_quantize.default, (random_weight(shape, dtype, device), blocksize)))
    for shape, dtype, blocksize, nested in [((33, 70), torch.bfloat16, 64, False), ((33, 70), torch.float16, 64, True),
                                            ((5, 300, 7), torch.float32, 32, True), ((1,), torch.bfloat16, 64, True)]:  # fmt: skip
        state = random_nf4_state(math.prod(shape), blocksize, nested, device)
        args = (state["packed"], state["absmax"], blocksize, list(shape), dtype)
        if nested:
            args += (state["nested_absmax"], state["nested_code"], state["nested_offset"], 256)
        samples.append((torch.ops.qlora_ext.nf4_dequantize.default, args))
    code = codebooks.dynamic_map(device=device)
    for shape, blocksize in [((1000,), 256), ((3, 77), 64)]:
        x = random_weight(shape, torch.float32, device)
        samples.append((torch.ops.qlora_ext.blockwise8_quantize.default, (x, code, blocksize)))
        samples.append((torch.ops.qlora_ext.blockwise8_quantize.default, (x, code, blocksize, x.mean().reshape(1))))
        codes, absmax = ops.blockwise8_quantize(x, code, blocksize)
        samples.append((torch.ops.qlora_ext.blockwise8_dequantize.default, (codes, absmax, code, blocksize)))
    return samples


def with_grad(args):
    """The same arguments with every float tensor requiring grad."""
    return tuple(
        a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck_every_op(device, requires_grad):
    samples = opcheck_samples(device)
    assert {op.name() for op, _ in samples} == {
        "qlora_ext::nf4_quantize", "qlora_ext::nf4_dequantize",
        "qlora_ext::blockwise8_quantize", "qlora_ext::blockwise8_dequantize",
    }  # fmt: skip
    for op, args in samples:
        torch.library.opcheck(op, with_grad(args) if requires_grad else args)


def test_outputs_never_require_grad(device, recwarn):
    # The ops are not differentiable (the quantized base is frozen): an output that required grad
    # would carry a "not implemented" backward that PyTorch warns may be silently wrong.
    for op, args in opcheck_samples(device):
        outputs = op(*with_grad(args))
        for out in outputs if isinstance(outputs, tuple) else (outputs,):
            assert not out.requires_grad, op.name()
    assert not [w for w in recwarn if "autograd kernel was not registered" in str(w.message)]


def test_meta_tensors_give_shapes_without_data():
    weight = torch.empty(33, 70, device="meta", dtype=torch.bfloat16)
    packed, absmax = ops.nf4_quantize(weight, 64)
    assert packed.shape == (1155, 1) and packed.dtype == torch.uint8 and packed.device.type == "meta"
    assert absmax.shape == (37,) and absmax.dtype == torch.float32
    out = ops.nf4_dequantize(packed, absmax, 64, [33, 70], torch.float16)
    assert out.shape == (33, 70) and out.dtype == torch.float16 and out.device.type == "meta"


def test_torch_compile_fullgraph_matches_eager(device):
    weight = random_weight((96, 200), torch.bfloat16, device)
    q = NF4Weight.from_float(weight, blocksize=64, double_quant=True)
    x = random_weight((5, 200), torch.bfloat16, device)

    def linear_from_nf4(x, packed, absmax_codes, absmax2, code, offset):
        # What a QLoRA layer does: quantize-free forward from the stored state.
        w = ops.nf4_dequantize(packed, absmax_codes, 64, [96, 200], torch.bfloat16, absmax2, code, offset)
        return x @ w.t(), w

    args = (x, q.packed, q.absmax, q.nested.absmax2, q.nested.code, q.nested.offset.reshape(1))
    compiled = torch.compile(linear_from_nf4, fullgraph=True)
    y_compiled, w_compiled = compiled(*args)
    y_eager, w_eager = linear_from_nf4(*args)
    assert_bitwise_equal(w_compiled, w_eager)
    torch.testing.assert_close(y_compiled, y_eager)

    quantize = torch.compile(lambda w: ops.nf4_quantize(w, 64), fullgraph=True)
    for got, want in zip(quantize(weight), ops.nf4_quantize(weight, 64)):
        assert_bitwise_equal(got, want)


# ---- the CUDA build really runs CUDA kernels ---------------------------------------------------


@requires_cuda
def test_cuda_device_means_cuda_build(build_info):
    # A CPU-only extension on a GPU machine is a build mistake (DESIGN.md §7), not a fallback.
    assert build_info["with_cuda"], f"GPU present but the extension was built without CUDA: {build_info}"


@pytest.mark.not_under_sanitizer
@requires_cuda
def test_cuda_tensors_run_cuda_kernels(build_info):
    from torch.profiler import ProfilerActivity, profile

    weight = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        q = NF4Weight.from_float(weight, blocksize=64, double_quant=True)
        out = q.dequantize()
        torch.cuda.synchronize()
    assert out.device.type == "cuda" and q.packed.device.type == "cuda" and q.absmax.device.type == "cuda"
    kernels = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    for name in ("nf4_quantize", "nf4_dequantize", "blockwise8_quantize"):
        assert any(name in k for k in kernels), f"no CUDA kernel named *{name}* ran; saw {sorted(kernels)}"


# ---- bad input: the error type, and a message that names the argument ------------------------


def _valid_dequantize_args(nested: bool, device="cpu"):
    state = random_nf4_state(200, 64, nested, device)
    args = dict(packed=state["packed"], absmax=state["absmax"], blocksize=64, shape=[10, 20], dtype=torch.float32)
    if nested:
        args.update(nested_absmax=state["nested_absmax"], nested_code=state["nested_code"],
                    nested_offset=state["nested_offset"])  # fmt: skip
    return args


def _dequantize_with(nested=False, **changes):
    return lambda: ops.nf4_dequantize(**{**_valid_dequantize_args(nested), **changes})


W = torch.randn(10, 20)
CODE = codebooks.dynamic_map()
UNSORTED_CODE = CODE.flip(0)

BAD_CALLS = {
    # nf4_quantize
    "quantize_int32": (lambda: ops.nf4_quantize(W.to(torch.int32), 64), RuntimeError, "weight must be float32, float16 or bfloat16"),
    "quantize_int8": (lambda: ops.nf4_quantize(W.to(torch.int8), 64), RuntimeError, "weight must be float32"),
    "quantize_uint8": (lambda: ops.nf4_quantize(W.to(torch.uint8), 64), RuntimeError, "weight must be float32"),
    "quantize_bool": (lambda: ops.nf4_quantize(W > 0, 64), RuntimeError, "weight must be float32"),
    "quantize_complex": (lambda: ops.nf4_quantize(W.to(torch.complex64), 64), RuntimeError, "weight must be float32"),
    "quantize_float64": (lambda: ops.nf4_quantize(W.double(), 64), RuntimeError, "weight must be float32"),
    "quantize_blocksize_0": (lambda: ops.nf4_quantize(W, 0), RuntimeError, "blocksize must be a power of two in \\[32, 4096\\], got 0"),
    "quantize_blocksize_48": (lambda: ops.nf4_quantize(W, 48), RuntimeError, "blocksize .* got 48"),
    "quantize_blocksize_16": (lambda: ops.nf4_quantize(W, 16), RuntimeError, "blocksize .* got 16"),
    "quantize_blocksize_8192": (lambda: ops.nf4_quantize(W, 8192), RuntimeError, "blocksize .* got 8192"),
    "quantize_blocksize_-64": (lambda: ops.nf4_quantize(W, -64), RuntimeError, "blocksize .* got -64"),
    # nf4_dequantize
    "dequantize_dtype_int32": (_dequantize_with(dtype=torch.int32), RuntimeError, "dtype must be float32, float16 or bfloat16"),
    "dequantize_dtype_bool": (_dequantize_with(dtype=torch.bool), RuntimeError, "dtype must be float32"),
    "dequantize_dtype_complex": (_dequantize_with(dtype=torch.complex64), RuntimeError, "dtype must be float32"),
    "dequantize_blocksize_0": (_dequantize_with(blocksize=0), RuntimeError, "blocksize .* got 0"),
    "dequantize_blocksize_48": (_dequantize_with(blocksize=48), RuntimeError, "blocksize .* got 48"),
    "dequantize_blocksize_8192": (_dequantize_with(blocksize=8192), RuntimeError, "blocksize .* got 8192"),
    "dequantize_blocksize_-64": (_dequantize_with(blocksize=-64), RuntimeError, "blocksize .* got -64"),
    "dequantize_negative_shape": (_dequantize_with(shape=[-10, -20]), RuntimeError, "shape must not have negative sizes"),
    "packed_too_small": (_dequantize_with(packed=torch.zeros(99, 1, dtype=torch.uint8)), RuntimeError, "packed must have 100 elements"),
    "packed_too_large": (_dequantize_with(packed=torch.zeros(101, 1, dtype=torch.uint8)), RuntimeError, "packed must have 100 elements"),
    "packed_int8": (_dequantize_with(packed=torch.zeros(100, 1, dtype=torch.int8)), RuntimeError, "packed must be Byte"),
    "packed_float": (_dequantize_with(packed=torch.zeros(100, 1)), RuntimeError, "packed must be Byte"),
    "absmax_too_few": (_dequantize_with(absmax=torch.ones(3)), RuntimeError, "absmax must have 4 elements"),
    "absmax_too_many": (_dequantize_with(absmax=torch.ones(5)), RuntimeError, "absmax must have 4 elements"),
    "absmax_half": (_dequantize_with(absmax=torch.ones(4, dtype=torch.half)), RuntimeError, "absmax must be Float"),
    "absmax_fp32_with_nested": (_dequantize_with(True, absmax=torch.ones(4)), RuntimeError, "absmax .*8-bit codes.* must be Byte"),
    "nested_absmax_only": (_dequantize_with(nested_absmax=torch.ones(1)), RuntimeError, "nested_absmax, nested_code and nested_offset go together.*got 1 of the 3"),
    "nested_without_offset": (_dequantize_with(True, nested_offset=None), RuntimeError, "nested_absmax, nested_code and nested_offset go together.*got 2 of the 3"),
    "nested_without_code": (_dequantize_with(True, nested_code=None), RuntimeError, "go together.*got 2 of the 3"),
    "nested_absmax_wrong_size": (_dequantize_with(True, nested_absmax=torch.ones(2)), RuntimeError, "nested_absmax must have 1 elements"),
    "nested_absmax_half": (_dequantize_with(True, nested_absmax=torch.ones(1, dtype=torch.half)), RuntimeError, "nested_absmax must be Float"),
    "nested_code_wrong_size": (_dequantize_with(True, nested_code=CODE[:255]), RuntimeError, "nested_code must have 256 elements"),
    "nested_code_float64": (_dequantize_with(True, nested_code=CODE.double()), RuntimeError, "nested_code must be Float"),
    "nested_offset_two_values": (_dequantize_with(True, nested_offset=torch.ones(2)), RuntimeError, "nested_offset must have 1 elements"),
    "nested_blocksize_0": (_dequantize_with(True, nested_blocksize=0), RuntimeError, "nested_blocksize must be a positive power of two, got 0"),
    "nested_blocksize_100": (_dequantize_with(True, nested_blocksize=100), RuntimeError, "nested_blocksize .* got 100"),
    # blockwise8_quantize / blockwise8_dequantize
    "blockwise8_x_half": (lambda: ops.blockwise8_quantize(W.half(), CODE, 256), RuntimeError, "x must be Float"),
    "blockwise8_x_int": (lambda: ops.blockwise8_quantize(W.int(), CODE, 256), RuntimeError, "x must be Float"),
    # The Python wrapper checks any map that is not the library's own; the native op checks CPU maps.
    "blockwise8_code_unsorted": (lambda: ops.blockwise8_quantize(W, UNSORTED_CODE, 256), ValueError, "code must be sorted ascending"),
    "blockwise8_native_code_unsorted": (lambda: torch.ops.qlora_ext.blockwise8_quantize(W, UNSORTED_CODE, 256), RuntimeError, "code must be sorted ascending"),
    "double_quantize_code_unsorted": (lambda: ops.nf4_double_quantize(W, 64, UNSORTED_CODE), ValueError, "nested_code must be sorted ascending"),
    "double_quantize_empty": (lambda: ops.nf4_double_quantize(torch.empty(0), 64), RuntimeError, "weight must not be empty"),
    "blockwise8_code_255": (lambda: ops.blockwise8_quantize(W, CODE[:255], 256), RuntimeError, "code must have 256 elements"),
    "blockwise8_offset_two_values": (lambda: ops.blockwise8_quantize(W, CODE, 256, torch.ones(2)), RuntimeError, "offset must have 1 elements"),
    "blockwise8_offset_half": (lambda: ops.blockwise8_quantize(W, CODE, 256, torch.ones(1, dtype=torch.half)), RuntimeError, "offset must be Float"),
    "blockwise8_code_float64": (lambda: ops.blockwise8_quantize(W, CODE.double(), 256), RuntimeError, "code must be Float"),
    "blockwise8_blocksize_0": (lambda: ops.blockwise8_quantize(W, CODE, 0), RuntimeError, "blocksize must be a positive power of two, got 0"),
    "blockwise8_blocksize_300": (lambda: ops.blockwise8_quantize(W, CODE, 300), RuntimeError, "blocksize .* got 300"),
    "blockwise8_dequantize_codes_int8": (lambda: ops.blockwise8_dequantize(torch.zeros(200, dtype=torch.int8), torch.ones(1), CODE, 256), RuntimeError, "codes must be Byte"),
    "blockwise8_dequantize_absmax_size": (lambda: ops.blockwise8_dequantize(torch.zeros(300, dtype=torch.uint8), torch.ones(1), CODE, 256), RuntimeError, "absmax must have 2 elements"),
    "blockwise8_dequantize_code_size": (lambda: ops.blockwise8_dequantize(torch.zeros(200, dtype=torch.uint8), torch.ones(1), CODE[:16], 256), RuntimeError, "code must have 256 elements"),
    # NF4Weight.from_float checks in Python first
    "from_float_int": (lambda: NF4Weight.from_float(W.int()), TypeError, "weight must be float32, float16 or bfloat16"),
    "from_float_not_tensor": (lambda: NF4Weight.from_float(W.tolist()), TypeError, "weight must be a torch.Tensor"),
    "from_float_blocksize_48": (lambda: NF4Weight.from_float(W, blocksize=48), ValueError, "blocksize must be one of .* got 48"),
    "from_float_blocksize_8192": (lambda: NF4Weight.from_float(W, blocksize=8192), ValueError, "blocksize .* got 8192"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=str)
def test_bad_input_raises_naming_the_argument(case):
    call, error_type, message = BAD_CALLS[case]
    with pytest.raises(error_type, match=message):
        call()


@pytest.mark.parametrize("blocksize", [0, 48, -64])
def test_fake_kernel_rejects_bad_blocksize_by_name(blocksize):
    # Under torch.compile / meta tensors the fake kernels check what the C++ checks.
    packed = torch.empty(100, 1, dtype=torch.uint8, device="meta")
    with pytest.raises(RuntimeError, match="blocksize"):
        ops.nf4_quantize(torch.empty(10, 20, device="meta"), blocksize)
    with pytest.raises(RuntimeError, match="blocksize"):
        ops.nf4_dequantize(packed, torch.empty(4, device="meta"), blocksize, [10, 20], torch.float32)
    code = torch.empty(256, device="meta")
    with pytest.raises(RuntimeError, match="blocksize"):
        ops.blockwise8_quantize(torch.empty(200, device="meta"), code, blocksize)
    with pytest.raises(RuntimeError, match="blocksize"):
        ops.blockwise8_dequantize(torch.empty(200, dtype=torch.uint8, device="meta"), torch.empty(1, device="meta"), code, blocksize)


@requires_cuda
@pytest.mark.parametrize("on_cpu", ["absmax", "nested_absmax", "nested_code", "nested_offset"])
def test_device_mix_raises_naming_the_tensor(on_cpu):
    args = _valid_dequantize_args(nested=True, device="cuda")
    args[on_cpu] = args[on_cpu].cpu()
    with pytest.raises(RuntimeError, match=f"{on_cpu} is on cpu but packed is on cuda"):
        ops.nf4_dequantize(**args)


@requires_cuda
def test_blockwise8_code_on_other_device_raises():
    with pytest.raises(RuntimeError, match="code is on cpu but x is on cuda"):
        ops.blockwise8_quantize(W.cuda(), CODE, 256)
    with pytest.raises(RuntimeError, match="offset is on cpu but x is on cuda"):
        ops.blockwise8_quantize(W.cuda(), CODE.cuda(), 256, torch.ones(1))


# ---- NF4Weight ---------------------------------------------------------------------------------


def test_nf4_weight_metadata(device):
    weight = random_weight((48, 130), torch.float16, device)
    q = NF4Weight.from_float(weight, blocksize=128)
    assert q.shape == torch.Size([48, 130]) and q.dtype == torch.float16
    assert q.device.type == device and q.blocksize == 128 and q.numel == 48 * 130
    out = q.dequantize()
    assert out.shape == weight.shape and out.dtype == torch.float16 and out.device.type == device
    assert q.dequantize(torch.float32).dtype == torch.float32
    assert_bitwise_equal(q.dequantize(torch.float32).to(torch.float16), out)  # one rounding either way


@pytest.mark.parametrize("target", DEVICES)
def test_nf4_weight_to_moves_every_tensor(device, target):
    q = NF4Weight.from_float(random_weight((64, 100), torch.bfloat16, device), double_quant=True)
    moved = q.to(target)
    tensors = [moved.packed, moved.absmax, moved.nested.absmax2, moved.nested.code, moved.nested.offset]
    assert all(t.device.type == target for t in tensors) and moved.device.type == target
    assert (moved.shape, moved.dtype, moved.blocksize) == (q.shape, q.dtype, q.blocksize)
    assert_bitwise_equal(moved.dequantize(), q.dequantize())


def test_nbytes_of_a_large_double_quantized_weight():
    shape = (4096, 4096)
    n = math.prod(shape)
    q = NF4Weight.from_float(torch.randn(shape, dtype=torch.bfloat16), blocksize=64, double_quant=True)
    # codes + 8-bit absmax codes + fp32 nested absmax + 256-entry map + offset
    n_blocks = n // 64
    assert q.nbytes == n // 2 + n_blocks + 4 * -(-n_blocks // 256) + 4 * 256 + 4
    assert q.nbytes * 8 / n == pytest.approx(4.127, abs=0.01)
    plain = NF4Weight.from_float(torch.randn(256, 256), blocksize=64, double_quant=False)
    assert plain.nbytes * 8 / plain.numel == 4.5


def test_repr_says_what_it_is():
    q = NF4Weight.from_float(torch.randn(64, 128, dtype=torch.bfloat16), blocksize=64, double_quant=True)
    text = repr(q)
    for part in ("NF4Weight", "shape=(64, 128)", "torch.bfloat16", "blocksize=64", "double_quant", "device=cpu", "bits/param"):
        assert part in text, (part, text)
    assert "double_quant" not in repr(NF4Weight.from_float(torch.randn(64), double_quant=False))


# ---- state dict: bitsandbytes' keys and bytes, round trips, corruption -----------------------

DQ_KEYS = {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
           "weight.quant_state.bitsandbytes__nf4"}  # fmt: skip
PLAIN_KEYS = {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}


def quant_state_of(sd, prefix="weight") -> dict:
    return json.loads(bytes(sd[f"{prefix}.quant_state.bitsandbytes__nf4"].tolist()).decode("utf-8"))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_state_dict_layout(double_quant):
    q = NF4Weight.from_float(torch.randn(30, 70, dtype=torch.bfloat16), blocksize=32, double_quant=double_quant)
    sd = q.state_dict("weight")
    assert set(sd) == (DQ_KEYS if double_quant else PLAIN_KEYS)
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (1050, 1)
    assert sd["weight.absmax"].dtype == (torch.uint8 if double_quant else torch.float32)
    assert torch.equal(sd["weight.quant_map"], codebooks.nf4_code())
    state = quant_state_of(sd)
    expected = {"quant_type": "nf4", "blocksize": 32, "dtype": "bfloat16", "shape": [30, 70]}
    if double_quant:
        expected.update(nested_blocksize=256, nested_dtype="float32", nested_offset=q.nested.offset.item())
        assert torch.equal(sd["weight.nested_quant_map"], codebooks.dynamic_map())
    assert list(state.items()) == list(expected.items())  # key order too: bitsandbytes' bytes


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_safetensors_round_trip(tmp_path, device, dtype, double_quant):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    q = NF4Weight.from_float(random_weight((77, 130), dtype, device), blocksize=64, double_quant=double_quant)
    path = tmp_path / "layer.safetensors"
    safetensors_torch.save_file({k: v.contiguous().cpu() for k, v in q.state_dict("model.layer.weight").items()}, str(path))
    loaded = safetensors_torch.load_file(str(path), device=device)
    q2 = NF4Weight.from_state_dict(loaded, prefix="model.layer.weight")
    assert (q2.shape, q2.dtype, q2.blocksize, q2.device.type) == (q.shape, q.dtype, q.blocksize, device)
    assert_bitwise_equal(q2.dequantize(), q.dequantize())


def _corrupt(sd: dict, key: str, value) -> dict:
    sd = dict(sd)
    if value is None:
        del sd[key]
    else:
        sd[key] = value
    return sd


def _json_bytes(obj) -> torch.Tensor:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _corrupt_state(**fields):
    """A quant_state JSON with some fields replaced (a value of ... deletes the field)."""

    def make(sd):
        state = quant_state_of(sd)
        for name, value in fields.items():
            if value is ...:
                del state[name]
            else:
                state[name] = value
        return _json_bytes(state)

    return make


QS = "weight.quant_state.bitsandbytes__nf4"
CORRUPTIONS = {
    # key to change -> (new value or a function of the valid state dict, what the message must say)
    "missing_weight": ("weight", None, "missing key 'weight'"),
    "missing_absmax": ("weight.absmax", None, "missing key 'weight.absmax'"),
    "missing_quant_map": ("weight.quant_map", None, "missing key 'weight.quant_map'"),
    "missing_nested_absmax": ("weight.nested_absmax", None, "weight.nested_absmax"),
    "missing_nested_quant_map": ("weight.nested_quant_map", None, "missing key 'weight.nested_quant_map'"),
    "missing_quant_state": (QS, None, "missing key 'weight.quant_state.bitsandbytes__nf4'"),
    "json_not_utf8": (QS, torch.tensor([0xFF, 0xFE, 0x7B], dtype=torch.uint8), f"{QS}: not valid UTF-8 JSON"),
    "json_truncated": (QS, lambda sd: sd[QS][:-5], f"{QS}: not valid UTF-8 JSON"),
    "json_is_a_list": (QS, _json_bytes([1, 2]), f"{QS}: expected a JSON object"),
    "json_no_blocksize": (QS, _corrupt_state(blocksize=...), f"{QS}: missing field 'blocksize'"),
    "json_no_shape": (QS, _corrupt_state(shape=...), f"{QS}: missing field 'shape'"),
    "json_blocksize_48": (QS, _corrupt_state(blocksize=48), f"{QS}: blocksize 48"),
    "json_blocksize_string": (QS, _corrupt_state(blocksize="64"), f"{QS}: field 'blocksize' has the wrong type"),
    "json_blocksize_bool": (QS, _corrupt_state(blocksize=True), f"{QS}: field 'blocksize' has the wrong type"),
    "json_dtype_float64": (QS, _corrupt_state(dtype="float64"), f"{QS}: dtype 'float64'"),
    "json_negative_shape": (QS, _corrupt_state(shape=[-30, -70]), f"{QS}: shape"),
    "json_shape_of_other_size": (QS, _corrupt_state(shape=[30, 71]), "weight: expected 1065 bytes of codes"),
    "json_quant_type_fp4": (QS, _corrupt_state(quant_type="fp4"), f"{QS}: quant_type 'fp4' is not supported"),
    "json_nested_offset_nan": (QS, _corrupt_state(nested_offset=math.nan), f"{QS}: nested_offset must be finite"),
    "json_nested_offset_missing": (QS, _corrupt_state(nested_offset=...), f"{QS}: missing field 'nested_offset'"),
    "json_nested_blocksize_100": (QS, _corrupt_state(nested_blocksize=100), f"{QS}: nested_blocksize 100"),
    "json_nested_dtype_float16": (QS, _corrupt_state(nested_dtype="float16"), f"{QS}: nested_dtype"),
    "packed_short": ("weight", lambda sd: sd["weight"][:-1], "weight: expected 1050 bytes of codes"),
    "absmax_float_when_nested": ("weight.absmax", lambda sd: sd["weight.absmax"].float(), "weight.absmax: expected dtype torch.uint8"),
    "absmax_short": ("weight.absmax", lambda sd: sd["weight.absmax"][:-1], "weight.absmax: expected 66 elements"),
    "nested_absmax_float16": ("weight.nested_absmax", lambda sd: sd["weight.nested_absmax"].half(), "weight.nested_absmax: expected dtype torch.float32"),
    "nested_absmax_long": ("weight.nested_absmax", lambda sd: torch.ones(2), "weight.nested_absmax: expected 1 elements"),
    "nested_quant_map_short": ("weight.nested_quant_map", lambda sd: sd["weight.nested_quant_map"][:128], "weight.nested_quant_map: expected 256 elements"),
    "quant_map_of_fp4": ("weight.quant_map", lambda sd: torch.linspace(-1, 1, 16), "weight.quant_map: is not the NF4 code map"),
    "quant_map_float16": ("weight.quant_map", lambda sd: sd["weight.quant_map"].half(), "weight.quant_map: expected dtype torch.float32"),
    "quant_map_not_a_tensor": ("weight.quant_map", lambda sd: list(codebooks.NF4_CODE), "weight.quant_map: expected a tensor"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CORRUPTIONS), ids=str)
def test_corrupt_state_dict_raises_naming_the_key(case):
    key, value, message = CORRUPTIONS[case]
    sd = NF4Weight.from_float(torch.randn(30, 70, dtype=torch.bfloat16), blocksize=32, double_quant=True).state_dict("weight")
    with pytest.raises(ValueError, match=re.escape(message)):
        NF4Weight.from_state_dict(_corrupt(sd, key, value(sd) if callable(value) else value), prefix="weight")


def test_fp4_state_dict_is_refused_by_name():
    sd = NF4Weight.from_float(torch.randn(64), double_quant=False).state_dict("weight")
    blob = sd.pop(QS)
    sd["weight.quant_state.bitsandbytes__fp4"] = blob
    with pytest.raises(ValueError, match="weight: FP4-quantized weights are not supported"):
        NF4Weight.from_state_dict(sd, prefix="weight")


def test_plain_state_dict_with_uint8_absmax_is_refused():
    sd = NF4Weight.from_float(torch.randn(640), double_quant=False).state_dict("weight")
    sd["weight.absmax"] = sd["weight.absmax"].to(torch.uint8)
    with pytest.raises(ValueError, match=r"weight\.absmax: expected dtype torch\.float32"):
        NF4Weight.from_state_dict(sd, prefix="weight")
