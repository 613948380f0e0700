"""The q, k and v projections of a Llama-family attention as one autograd unit, for LoRA on an NF4 base.

    q = x·Wqᵀ (+ bq) + s_q·(x·Aqᵀ)·Bqᵀ      k, v likewise (three QLoRALinear layers, one input x)

Module by module that is three autograd nodes, three saved copies of the reference to x, three
dequantizations and three Python call chains (module, adapter, wrapper checks, routing, eager
autograd.Function) per pass, and a sum of three [M, K] input gradients. Training a 1B Llama is
host-bound (the GPU waits on Python and the dispatcher), so this unit does the same arithmetic
with one node and fewer operators:

  forward   W = [deq(Wq); deq(Wk); deq(Wv)]           [Nq+Nk+Nv, K], one buffer (the only dense W)
            y = x·Wᵀ (+ [bq; bk; bv])                 one GEMM;  q, k, v are column blocks of y
            xa = x·[Aq; Ak; Av]ᵀ                      [M, rq+rk+rv], one thin GEMM
            y_q += s_q·xa_q·Bqᵀ, ...                  three thin addmm into the blocks of y
  saved     x (once), xa, [Aq; Ak; Av] and the B's in x's dtype (adapter-sized), the NF4 tensors
  backward  dy = [dq, dk, dv]                         [M, Nq+Nk+Nv], one concatenation
            g_i = s_i·dy_i·B_i                        [M, r_i], written into one g [M, rq+rk+rv]
            dx = dy·W + g·[Aq; Ak; Av]                W dequantized again; one GEMM + one addmm
            [dAq; dAk; dAv] = gᵀ·x                    one GEMM;  dB_i = s_i·dy_iᵀ·xa_i
            dbias = Σ_rows dy                          (if the biases train)

Thin products are bracketed so nothing K×K or N×K beyond deq(W) forms. Each piece is the
arithmetic of `nf4_lora_linear` (lora_linear.py: the same dequantization function and cast, the
same op order — linear, then addmm of s·xa·Bᵀ; g = (dy·B)·s, dB = (dyᵀ·xa)·s) on a concatenation,
so the results are the module path's up to the order of a GEMM's blocking.

`CONCAT_WEIGHTS` (below) chooses between the one [Nq+Nk+Nv, K] GEMM above and three GEMMs on the
three dequantized weights (dx then dq·Wq + dk·Wk + dv·Wv accumulated into one tensor); the LoRA
part is concatenated either way. See its comment for the measurement that chose.

DoRA (dora.py), on DORA_DEVICES: when all three adapters are DoRA, one autograd node runs the
three projections, y_i = c_i ⊙ z_i (+ bias), c = m/n with the row norm n of W + s·BA detached, dm
from z. On DORA_CONCAT_DEVICES `_DoRAQKVConcat` forms z = [z_q, z_k, z_v] with the LoRA unit's
arithmetic above (concatenated weights and A's), then scales all columns at once and runs one
scale backward over [dq, dk, dv] before the LoRA backward on dz; on DORA_STACKED_NORM_DEVICES its
three norms take one call (dora.dora_scale_stacked: W·Aᵀ as one GEMM over the concatenated
weights and A's, one A·Aᵀ, one kernel). Elsewhere `_DoRAQKV` runs each
projection with `nf4_dora_linear`'s own body, setup and backward (fused_mlp.py's `_project` /
`_backward`, as the DoRA MLP), without concatenation. What either saves over three DoRA modules
is host time (the step is host-bound): one node and one Python call chain instead of three, x
saved once, the input gradients summed in place (and, concatenated, a third of the GEMMs, column
scales and scale backwards). Under checkpointing the recomputation reuses the first forward's
norms (checkpointing.remember / replayed).

It applies when the three layers are QLoRALinear whose active adapters are all plain LoRA (rsLoRA,
LoRA+ included: they only change s and the optimizer) or all DoRA, without dropout in training,
computing in the input's dtype (compute_dtype None). Everything else takes the modules: other
variants (LoRA-FA, VeRA, Delta-LoRA), a LoRA/DoRA mix, adapters disabled or merged, torch.compile (the graph needs the
registered operators), and inference that the fused 4-bit kernels serve (`_ops.linear_route`:
decode and prefill on CUDA without gradients read each packed weight once through
nf4_gemv/nf4_gemm, where this unit would dequantize all three).

    qlora_ext.fused_qkv.enable_fused_qkv(model)   # prepare(fused_qkv=None/True) calls it
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ops, checkpointing, dora, fused_blocks
from .adapters import LoRAAdapter
from .fused_mlp import _A, _B, _BIAS, _DORA, _M, _X, _adapter_kind, _backward, _norm, _project
from .layers import QLoRALinear
from .lora_linear import _autocast_off, _dequantize, _weight_args, mm_as, use_operators

#: One GEMM on the concatenated weights (True) or three GEMMs, one per dequantized weight (False).
#: On the 2-core CPU (bench_host_overhead.py --methods lora --qkv both --profile --fused-cpu, with
#: and without --qkv-three-gemms) the host time per decoder layer was the same within noise (4.52
#: vs 4.61 ms; the modules 5.03) and concatenating dispatched 29 ops fewer per layer (2 computing).
#: On a GPU it trades two copies (the dequantized weights, the output gradients: ~12 MiB each per
#: 1B layer at 2048 tokens, ~10 us) for one GEMM in place of three, whose k/v parts (N = 512 for
#: the 1B model) fill half an H100's SMs; not measured on a GPU yet (bench_train.py stacks ours
#: vs ours_qkv_three_gemms).
CONCAT_WEIGHTS = True

#: Device types where the unit runs (both; a tuple so that a device type can be taken out). On the
#: H100 (2026-12-05, bench_train.py, seq 2048): 8B 7,447 -> 9,218 tokens/s (+24%, peak memory
#: +0.02 GiB), 1B 15,674 -> 16,557 (+6%); its CUDA tests passed there.
DEVICES: tuple[str, ...] = ("cpu", "cuda")
#: Device types where the unit takes DoRA adapters (_DoRAQKV; a subset of DEVICES). On the H100
#: (2026-12-06) its CUDA tests passed and QDoRA/QLoRA at 8B, seq 2048 went from 1.19x to 1.18x
#: (bench_lora_family.py; the same peak memory): little, since DoRA's extra time there is mostly
#: the column scale z * c and the norm's W·Aᵀ (benchmarks/results/lora_family_dora_profile_8b_h100.txt).
DORA_DEVICES: tuple[str, ...] = ("cpu", "cuda")
#: Device types where that DoRA unit works on the concatenated weights (_DoRAQKVConcat: one base
#: GEMM, one thin GEMM, one column scale and one scale backward where _DoRAQKV runs three of each).
#: On the 2-core CPU (bench_host_overhead.py --methods lora,dora --profile --fused-cpu, r 16, 6
#: layers) a DoRA decoder layer dispatched 213 computing ops instead of 244 (LoRA's: 175) and 1,247
#: ops in all instead of 1,392; host time per layer over LoRA's, best rounds of two runs each:
#: 1.13x and 1.13x with it, 1.22x and 1.17x without. On the H100 (2026-12-06, run.sh dora_new
#: dora_ab) its CUDA tests passed and one profiled step's summed kernel time went 258.2 -> 253.9 ms
#: at 8B and 62.7 -> 59.7 ms at 1B (seq 2048, r 16; lora_family_dora_ab_noisy_{8b,1b}_h100.json:
#: that host was noisy, so its step times are not the evidence). On a quiet one, interleaved,
#: QDoRA/QLoRA with it against without: 8B 1.125x / 1.158x, 1B 1.199x / 1.244x
#: (lora_family_dora_concat_{8b,1b}_h100.json).
DORA_CONCAT_DEVICES: tuple[str, ...] = ("cpu", "cuda")
#: Device types where _DoRAQKVConcat takes the three norms in one call (dora.dora_scale_stacked:
#: W·Aᵀ as one GEMM over the stacked weights and A's, one A·Aᵀ, one norm kernel) instead of three
#: (W_i·A_iᵀ, A_i·A_iᵀ and the kernel per projection, then two concatenations), where the three
#: adapters have one rank. On the 2-core CPU (bench_host_overhead.py --methods lora,dora --profile
#: --fused-cpu) a DoRA decoder layer dispatched 208 computing ops instead of 213 (LoRA: 175), at
#: no measurable difference in CPU time there (the W·Aᵀ GEMM has three times the columns, and CPU
#: ops compute). On the H100 a QDoRA step launched ~50 kernels per layer more than QLoRA's
#: (lora_family_dora_profile_concat_1b_h100.txt), this takes the Q/K/V norms' ~15 of them down to
#: ~6. H100 (2026-12-06, bench_lora_family --interleave, lora_family_dora_candidates_{8b,1b}_h100.json):
#: QDoRA/QLoRA 1.105 -> 1.099 at 8B, 1.203 -> 1.178 at 1B; its CUDA tests passed.
DORA_STACKED_NORM_DEVICES: tuple[str, ...] = ("cpu", "cuda")


#: Device types where the concatenated weights are dequantized straight into their row ranges
#: of one buffer (_ops.nf4_dequantize_into) instead of dequantized apart and copied by torch.cat:
#: on the H100 the copy took 3.5 ms of an 8B QLoRA step (95 launches;
#: benchmarks/results/lora_family_dora_profile_8b_h100.txt). Its CUDA tests passed on an H200
#: (2026-12-06); 8B QLoRA at seq 8192 ran at 10,151 tokens/s with it, 10,103 without (same run).
DEQUANTIZE_INTO_DEVICES: tuple[str, ...] = ("cpu", "cuda")


def _dequantized(specs, dtype: torch.dtype, concat: bool) -> list[Tensor] | Tensor:
    """deq(W) of each projection in `dtype` (bits as nf4_lora_linear's), concatenated along the
    output rows into one [Nq+Nk+Nv, K] buffer if `concat`."""
    if concat and _dequantizes_in_place(specs, dtype):
        rows = [spec[7][0] for spec in specs]  # weight_shape [N, K]
        w = torch.empty((sum(rows), specs[0][7][1]), dtype=dtype, device=specs[0][0].device)
        for spec, piece in zip(specs, w.split(rows)):
            packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize = spec[:7]
            _ops.nf4_dequantize_into(piece, packed, absmax, blocksize, nested_absmax, nested_code, nested_offset,
                                     nested_blocksize)  # fmt: skip
        return w
    ws = [_dequantize(*spec, dtype) for spec in specs]
    if not concat:
        return ws
    return torch.cat(ws)  # the three pieces are freed on return: one dense copy remains


def _dequantizes_in_place(specs, dtype: torch.dtype) -> bool:
    """The buffer path applies: every weight stored in `dtype` (nothing to cast after
    dequantizing: the bits then equal _dequantize's) with one K, on a DEQUANTIZE_INTO_DEVICES device."""
    return (specs[0][0].device.type in DEQUANTIZE_INTO_DEVICES and all(spec[8] == dtype for spec in specs)
            and len({spec[7][1] for spec in specs}) == 1)  # fmt: skip


def _cat_bias(biases, ns: list[int], x: Tensor) -> Tensor | None:
    """[bq; bk; bv] in x's dtype (zeros for a projection without one), or None if none has one."""
    if all(b is None for b in biases):
        return None
    return torch.cat([x.new_zeros(n) if b is None else b.to(x.dtype) for b, n in zip(biases, ns)])


def _cat_cast(a_s, dtype: torch.dtype) -> tuple[Tensor, list[int]]:
    """[Aq; Ak; Av] in `dtype` (one cast; a checkpointed layer's recomputation reuses its first
    forward's: checkpointing.kept_constant) and the ranks."""
    key = ("qlora_ext.fused_qkv.a", *(id(t) for t in a_s), *(t._version for t in a_s), dtype)
    return checkpointing.kept_constant(key, lambda: torch.cat(a_s).to(dtype), *a_s), [t.shape[0] for t in a_s]


def _cast_bs(b_s, dtype: torch.dtype, b_cat: Tensor | None = None) -> list[Tensor]:
    """The B's in `dtype`: where they need a cast and share a rank and a dtype, row blocks of one
    cast of their concatenation `b_cat` (made here if None): two launches instead of three, the
    same values. Otherwise each cast (no op where already in `dtype`)."""
    if all(t.dtype == dtype for t in b_s) or len({(t.shape[1], t.dtype) for t in b_s}) != 1:
        return [checkpointing.kept_cast(t, dtype) for t in b_s]
    if b_cat is not None:
        return list(b_cat.to(dtype).split([t.shape[0] for t in b_s]))
    key = ("qlora_ext.fused_qkv.b", *(id(t) for t in b_s), *(t._version for t in b_s), dtype)
    cast = checkpointing.kept_constant(key, lambda: torch.cat(b_s).to(dtype), *b_s)
    return list(cast.split([t.shape[0] for t in b_s]))


#: Device types where the fused LoRA Q/K/V unit, with its weights concatenated, treats the three
#: low-rank updates as one of rank rq+rk+rv with the block-diagonal B = diag(s_q·Bq, s_k·Bk,
#: s_v·Bv) [Nq+Nk+Nv, rq+rk+rv]: one GEMM adds them to the output and one forms the backward's
#: thin gradient g (instead of three each). The zero blocks cost (N·r·M multiply-adds, ~1% of the
#: base GEMM at r 16), the scale is folded into B (rounded once, as the K-extended gate/up fold
#: it), and a checkpointed layer builds B once (checkpointing.kept_constant).
BLOCK_DIAGONAL_B_DEVICES: tuple[str, ...] = ("cpu", "cuda")


def _block_diagonal_b(b_s, scales, dtype: torch.dtype) -> Tensor:
    """diag(s_q·Bq, s_k·Bk, s_v·Bv) in `dtype`, [Nq+Nk+Nv, rq+rk+rv]."""

    def make():
        ns, rs = [t.shape[0] for t in b_s], [t.shape[1] for t in b_s]
        out = b_s[0].new_zeros((sum(ns), sum(rs)), dtype=dtype)
        row = col = 0
        for b, s, n, r in zip(b_s, scales, ns, rs):
            block = out[row : row + n, col : col + r]
            torch.mul(b, s, out=block) if s != 1 else block.copy_(b)
            row, col = row + n, col + r
        return out

    key = ("qlora_ext.fused_qkv.b_block_diagonal", *(id(t) for t in b_s), *(t._version for t in b_s), *scales, dtype)
    return checkpointing.kept_constant(key, make, *b_s)


def _block_diagonal_applies(concat: bool, x: Tensor) -> bool:
    return concat and x.device.type in BLOCK_DIAGONAL_B_DEVICES


def _add_low_rank(outs, x2: Tensor, a: Tensor, rs: list[int], b_s, scales,
                  b_cat: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
    """outs[i] += s_i·(x·A_iᵀ)·B_iᵀ in place, nf4_lora_linear's order, with one thin GEMM
    xa = x·[Aq; Ak; Av]ᵀ [M, rq+rk+rv]. Returns xa and the B's cast to x's dtype (saved for
    backward); `b_cat`: [Bq; Bk; Bv] where the caller has it."""
    xa = F.linear(x2, a)
    bs = _cast_bs(b_s, x2.dtype, b_cat)
    for out, xa_i, b, s in zip(outs, xa.split(rs, dim=1), bs, scales):
        out.addmm_(xa_i, b.t(), alpha=s)
    return xa, bs


def _low_rank_backward(dys, dy: Tensor | None, x: Tensor, xa: Tensor, a: Tensor, bs, scales, specs, need_x: bool,
                       need_a, need_b, a_dtypes, b_dtypes, ranks=None) -> tuple[Tensor | None, list, list]:  # fmt: skip
    """dx, the A's and the B's gradients of out_i = x·W_iᵀ + s_i·(x·A_iᵀ)·B_iᵀ from dout_i = dys[i]
    (with `dy` their [M, Nq+Nk+Nv] concatenation: dx by one GEMM on the concatenated weights;
    None: three). g_i = s_i·dy_i·B_i goes into one g [M, rq+rk+rv]; dx = dy·W + g·[Aq; Ak; Av].
    `bs`: the B's cast, or one block-diagonal [s_q·Bq ...] (_block_diagonal_b) with the `ranks`."""
    m, k = dys[0].shape[0], x.shape[-1]
    if isinstance(bs, Tensor):  # the block-diagonal s·B (BLOCK_DIAGONAL_B_DEVICES): g in one GEMM
        rs = ranks
        g = torch.mm(dy, bs)
    else:
        rs = [b.shape[1] for b in bs]
        g = xa.new_empty((m, sum(rs)))  # [M, rq+rk+rv]: the gradient reaching xa
        for dy_i, b, g_i, s in zip(dys, bs, g.split(rs, dim=1), scales):
            torch.mm(dy_i, b, out=g_i)
            if s != 1:
                g_i.mul_(s)
    dx = None
    if need_x:
        w = _dequantized(specs, x.dtype, dy is not None)
        if dy is not None:
            dx = torch.mm(dy, w)  # [M, K]
        else:
            dx = torch.mm(dys[0], w[0])
            dx.addmm_(dys[1], w[1]).addmm_(dys[2], w[2])
        del w
        dx.addmm_(g, a)
        dx = dx.view(*x.shape)
    das = [None] * 3
    if any(need_a):
        gt, x2 = g.t(), x.reshape(m, k)
        # [rq+rk+rv, K]: in the A's dtype at once where they share one; the rows are contiguous views
        da = mm_as(gt, x2, a_dtypes[0]) if len(set(a_dtypes)) == 1 else torch.mm(gt, x2)
        das = [d.to(t) if need_a[i] else None for i, (d, t) in enumerate(zip(da.split(rs), a_dtypes))]
    dbs = [None] * 3
    for i, (dy_i, xa_i, s, t) in enumerate(zip(dys, xa.split(rs, dim=1), scales, b_dtypes)):
        if need_b[i]:
            dbs[i] = mm_as(dy_i.t(), xa_i, t, s)  # [N_i, r_i]
    return dx, das, dbs


class _LoRAQKV(torch.autograd.Function):
    """See the module docstring. Inputs after x: the three projections' weight arguments (lora_linear
    `_weight_args` order) and scales, whether to concatenate the weights, then the three biases,
    the three A's and the three B's (the tensors autograd differentiates)."""

    @staticmethod
    def forward(ctx, x, specs, scales, concat, bias_q, bias_k, bias_v, a_q, a_k, a_v, b_q, b_k, b_v):
        dtype, k = x.dtype, x.shape[-1]
        lead, m = x.shape[:-1], math.prod(x.shape[:-1])
        ns = [spec[7][0] for spec in specs]  # weight_shape = [N, K]
        biases, a_s, b_s = (bias_q, bias_k, bias_v), (a_q, a_k, a_v), (b_q, b_k, b_v)
        ctx.device_type = x.device.type
        with _autocast_off(x.device.type):
            x2 = x.reshape(m, k)
            block_diagonal = _block_diagonal_applies(concat, x)
            if checkpointing.projection_outputs_unused():
                # a recomputation whose q, k, v feed only replayed values (attention_replay): no
                # dequantization, no GEMM; what the backward reads (xa, the casts) as usual
                outs = list(x2.new_empty((m, sum(ns))).split(ns, dim=1))
                a, rs = _cat_cast(a_s, dtype)
                xa = F.linear(x2, a)
                bs = _block_diagonal_b(b_s, scales, dtype) if block_diagonal else _cast_bs(b_s, dtype)
            else:
                w = _dequantized(specs, dtype, concat)
                if concat:
                    y = F.linear(x2, w, _cat_bias(biases, ns, x))  # [M, Nq+Nk+Nv]
                    outs = list(y.split(ns, dim=1))
                else:
                    outs = [F.linear(x2, wi, None if b is None else b.to(dtype)) for wi, b in zip(w, biases)]
                del w  # the only dense W; gone before the thin products allocate
                a, rs = _cat_cast(a_s, dtype)  # [rq+rk+rv, K]
                if block_diagonal:  # y += xa·diag(s·B)ᵀ: the three updates in one GEMM
                    xa, bs = F.linear(x2, a), _block_diagonal_b(b_s, scales, dtype)
                    y.addmm_(xa, bs.t())
                else:
                    xa, bs = _add_low_rank(outs, x2, a, rs, b_s, scales)
        ctx.shapes = (ns, rs, m, k)
        ctx.scales, ctx.specs, ctx.concat = scales, specs, concat
        ctx.param_dtypes = ([None if b is None else b.dtype for b in biases], [t.dtype for t in a_s],
                            [t.dtype for t in b_s])  # fmt: skip
        # x is an input (autograd keeps it anyway); a and the cast B's are adapter-sized.
        ctx.block_diagonal = block_diagonal
        ctx.save_for_backward(x, xa, a, *((bs,) if block_diagonal else bs))
        return tuple(o.view(*lead, o.shape[1]) for o in outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, xa, a, *bs = ctx.saved_tensors
        ns, _, m, _ = ctx.shapes
        need = ctx.needs_input_grad
        with _autocast_off(ctx.device_type):
            grads_out = (dq, dk, dv)
            dy = None
            if ctx.concat:
                dy = torch.cat(grads_out, dim=-1).view(m, sum(ns))  # [M, Nq+Nk+Nv]
                dys = dy.split(ns, dim=1)
            else:
                dys = [d.reshape(m, n) for d, n in zip(grads_out, ns)]
            bias_dtypes, a_dtypes, b_dtypes = ctx.param_dtypes
            dbiases = [None] * 3
            if any(need[4:7]):
                sums = dy.sum(0).split(ns) if ctx.concat else [d.sum(0) for d in dys]
                dbiases = [s.to(t) if need[4 + i] else None for i, (s, t) in enumerate(zip(sums, bias_dtypes))]
            dx, das, dbs = _low_rank_backward(dys, dy if ctx.concat else None, x, xa, a,
                                              bs[0] if ctx.block_diagonal else bs, ctx.scales, ctx.specs,
                                              need[0], need[7:10], need[10:13], a_dtypes, b_dtypes,
                                              ranks=ctx.shapes[1])  # fmt: skip
        return dx, None, None, None, *dbiases, *das, *dbs


class _DoRAQKV(torch.autograd.Function):
    """q, k, v for three DoRA adapters as one autograd node (see the module docstring's DoRA part).
    Inputs after x: per projection (weight args, scale) and DoRA's (m, ‖W‖²), then the three biases,
    A's, B's and magnitudes (the tensors autograd differentiates). Each projection is
    nf4_dora_linear's body, setup and backward (fused_mlp's `_project` / `_backward`, as its MLP)."""

    @staticmethod
    def forward(ctx, x, specs, extras, bias_q, bias_k, bias_v, a_q, a_k, a_v, b_q, b_k, b_v, m_q, m_k, m_v):
        triples = ((bias_q, a_q, b_q), (bias_k, a_k, b_k), (bias_v, a_v, b_v))
        ctx.device_type = x.device.type
        # An unused output's gradient arrives as None (as the modules get none): its projection's
        # backward is skipped instead of running on zeros.
        ctx.set_materialize_grads(False)
        # dx only where x needs it (a frozen embedding's output, the first layer's input, does not)
        needs = [(ctx.needs_input_grad[0], *_DORA.needs(*t, e)[1:]) for t, e in zip(triples, extras)]
        # The weight norms depend only on the parameters: a checkpointed layer's recomputation
        # reuses its first forward's (W·Aᵀ and the norm kernel skipped; the same bits).
        key = ("qlora_ext.fused_qkv", id(specs[0][0][0]), id(m_q))  # q's codes and magnitude
        norms = checkpointing.replayed(key) or (None, None, None)
        if norms[0] is not None and (norms[0][1].dtype != x.dtype or norms[0][1].device != x.device):
            norms = (None, None, None)
        with _autocast_off(x.device.type):
            outs = [_project(_DORA, x, spec, bias, a, b, extra, need, norm)
                    for (bias, a, b), spec, extra, need, norm in zip(triples, specs, extras, needs, norms)]  # fmt: skip
            checkpointing.remember(key, tuple(_norm(out) for out, _ in outs))
        states = [state for _, state in outs]
        # Each projection saved x first (its low-rank input): kept once here. Everything goes
        # through save_for_backward so that checkpointing's saved-tensor hooks see it.
        ctx.states = states
        ctx.layout = [len(st.saved_tensors) - 1 for st in states]
        ctx.save_for_backward(x, *(t for st in states for t in st.saved_tensors[1:]))
        for st in states:
            st.saved_tensors = None
        return tuple(out[0] for out, _ in outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, *rest = ctx.saved_tensors
        dx, grads = None, []
        with _autocast_off(ctx.device_type):
            at = 0
            for st, n, dy in zip(ctx.states, ctx.layout, (dq, dk, dv)):
                st.saved_tensors, at = (x, *rest[at : at + n]), at + n
                g = _backward(_DORA, st, dy)  # nf4_dora_linear's 17 gradients (all None for dy None)
                st.saved_tensors = None  # the activations stay with autograd (retain_graph) or go
                if g[_X] is not None:
                    dx = g[_X] if dx is None else dx.add_(g[_X])
                grads.append(g)
        return (dx, None, None, *(g[_BIAS] for g in grads), *(g[_A] for g in grads), *(g[_B] for g in grads),
                *(g[_M] for g in grads))  # fmt: skip


class _DoRAQKVConcat(torch.autograd.Function):
    """q, k, v for three DoRA adapters on concatenated weights (DORA_CONCAT_DEVICES): _LoRAQKV's
    arithmetic gives z = [z_q, z_k, z_v] [M, Nq+Nk+Nv] (one base GEMM, one x·[Aq; Ak; Av]ᵀ), the
    three norms give c = [c_q; c_k; c_v], and one column scale gives y = c ⊙ z (+ [bq; bk; bv]);
    q, k, v are column blocks of y. Backward: one dora_scale_backward over dy = [dq, dk, dv]
    (dz = dy ⊙ c and every dm), then _LoRAQKV's backward on dz. Inputs as _DoRAQKV's. Per pass
    that is one GEMM, one thin GEMM and one column scale where _DoRAQKV runs three of each, and in
    backward one scale backward, one dx GEMM and one dA GEMM instead of three: for a host-bound
    step (a 1B model) the launches are the cost."""

    @staticmethod
    def forward(ctx, x, specs, extras, bias_q, bias_k, bias_v, a_q, a_k, a_v, b_q, b_k, b_v, m_q, m_k, m_v):
        weight_args, scales = [spec[0] for spec in specs], [spec[1] for spec in specs]
        dtype, k = x.dtype, x.shape[-1]
        lead, m = x.shape[:-1], math.prod(x.shape[:-1])
        ns = [args[7][0] for args in weight_args]  # weight_shape = [N, K]
        biases, a_s, b_s = (bias_q, bias_k, bias_v), (a_q, a_k, a_v), (b_q, b_k, b_v)
        ctx.device_type = x.device.type
        # An output that reaches no loss gets no gradient (as through the modules), not zeros.
        ctx.set_materialize_grads(False)
        # The norms depend only on the parameters: a checkpointed layer's recomputation reuses its
        # first forward's (W·Aᵀ and the norm kernels skipped; the same bits).
        key = ("qlora_ext.fused_qkv.concat", id(weight_args[0][0]), id(m_q))  # q's codes and magnitude
        norm = checkpointing.replayed(key)
        if norm is not None and (norm[1].dtype != dtype or norm[1].device != x.device):
            norm = None
        with _autocast_off(x.device.type):
            x2 = x.reshape(m, k)
            w = _dequantized(weight_args, dtype, True)
            z = F.linear(x2, w)  # [M, Nq+Nk+Nv]
            a_stacked = torch.cat(a_s)  # [rq+rk+rv, K], the parameters' dtype (the norms' A·Aᵀ)
            a, rs = a_stacked.to(dtype), [t.shape[0] for t in a_s]
            stacked = norm is None and _stacks_norms(x, a_s, b_s)
            if stacked:  # every W_i·A_jᵀ in one GEMM [Nq+Nk+Nv, rq+rk+rv]; row block i reads block i
                wa = F.linear(w, a)
            elif norm is None:  # W_i·A_iᵀ from the blocks of the one dequantized W
                was = [dora.weight_times_a(w_i, a_i, args[:8])
                       for w_i, a_i, args in zip(w.split(ns), a.split(rs), weight_args)]  # fmt: skip
            del w  # the only dense W; gone before the thin products allocate
            b_stacked = torch.cat(b_s) if stacked else None  # [Nq+Nk+Nv, r], the parameters' dtype
            xa, bs = _add_low_rank(z.split(ns, dim=1), x2, a, rs, b_s, scales, b_stacked)
            if stacked:
                c, inv_norm = dora.dora_scale_stacked(wa, a_stacked, b_stacked, torch.cat([e[1] for e in extras]),
                                                      torch.cat([e[0] for e in extras]), ns, scales)  # fmt: skip
                norm = (inv_norm, c)
            elif norm is None:
                pairs = [dora.dora_scale(wa, a_i, b_i, extra[1], extra[0], s)
                         for wa, a_i, b_i, extra, s in zip(was, a_s, b_s, extras, scales)]  # fmt: skip
                norm = (torch.cat([p[1] for p in pairs]), torch.cat([p[0] for p in pairs]))  # (1/n, c) [Nq+Nk+Nv]
            checkpointing.remember(key, norm)
            inv_norm, c = norm
            y = dora.dora_output(z, c, _cat_bias(biases, ns, x))
        ctx.shapes, ctx.scales, ctx.specs = (ns, m), scales, weight_args
        ctx.param_dtypes = ([None if b is None else b.dtype for b in biases], [t.dtype for t in a_s],
                            [t.dtype for t in b_s], [extra[0].dtype for extra in extras])  # fmt: skip
        ctx.save_for_backward(x, xa, a, z, inv_norm, c, *bs)
        return tuple(o.view(*lead, o.shape[1]) for o in y.split(ns, dim=1))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        grads_out = (dq, dk, dv)
        if all(d is None for d in grads_out):
            return (None,) * 15
        x, xa, a, z, inv_norm, c, *bs = ctx.saved_tensors
        ns, m = ctx.shapes
        need = ctx.needs_input_grad
        used = [d is not None for d in grads_out]
        with _autocast_off(ctx.device_type):
            dy = torch.cat([d.reshape(m, n) if d is not None else z.new_zeros((m, n)) for d, n in zip(grads_out, ns)],
                           dim=1)  # fmt: skip
            dm = None
            if any(need[12:15]):  # dz = dy ⊙ c (n constant) and dm = Σ_rows dy ⊙ z / n in one pass
                dz, dm = dora.dora_scale_backward(dy, z, c, inv_norm)
            else:
                dz = dy * c
            bias_dtypes, a_dtypes, b_dtypes, m_dtypes = ctx.param_dtypes
            dbiases = [None] * 3
            if any(need[3:6]):
                sums = dy.sum(0).split(ns)
                dbiases = [s.to(t) if need[3 + i] and used[i] else None
                           for i, (s, t) in enumerate(zip(sums, bias_dtypes))]  # fmt: skip
            del dy  # [M, Nq+Nk+Nv]: gone before the dequantized W and dx allocate
            need_a = [need[6 + i] and used[i] for i in range(3)]
            need_b = [need[9 + i] and used[i] for i in range(3)]
            dx, das, dbs = _low_rank_backward(dz.split(ns, dim=1), dz, x, xa, a, bs, ctx.scales, ctx.specs, need[0],
                                              need_a, need_b, a_dtypes, b_dtypes)  # fmt: skip
            dms = [None] * 3
            if dm is not None:
                dms = [d.to(t) if need[12 + i] and used[i] else None
                       for i, (d, t) in enumerate(zip(dm.split(ns), m_dtypes))]  # fmt: skip
        return dx, None, None, *dbiases, *das, *dbs, *dms


def _stacks_norms(x: Tensor, a_s, b_s) -> bool:
    """_DoRAQKVConcat's three norms take one dora_scale_stacked call: on DORA_STACKED_NORM_DEVICES,
    with one rank and one dtype for the three adapters, unless W·Aᵀ comes from the NF4 codes."""
    return (x.device.type in DORA_STACKED_NORM_DEVICES and x.device.type not in dora.NORM_FROM_CODES_DEVICES
            and len({t.shape[0] for t in a_s}) == 1 and len({t.dtype for t in (*a_s, *b_s)}) == 1)  # fmt: skip


def lora_qkv(x: Tensor, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module) -> tuple[Tensor, Tensor, Tensor] | None:
    """(q_proj(x), k_proj(x), v_proj(x)) as one autograd unit, or None where it does not apply (see
    the module docstring); the caller then runs the modules. q, k, v are [..., N_i] views into one
    [..., Nq+Nk+Nv] tensor (LoRA with CONCAT_WEIGHTS) or three tensors (otherwise, DoRA always). As outputs of one autograd node that
    are views, they may not be modified in place while autograd records (PyTorch refuses it; the
    attention forwards here never do: RoPE is in place only without gradients)."""
    layers = (q_proj, k_proj, v_proj)
    found = [_adapter_kind(layer) for layer in layers]
    if any(f is None for f in found) or use_operators() or not x.is_floating_point():
        return None
    dora = found[0][0] is _DORA
    if any(f[0] is not found[0][0] for f in found):  # a LoRA/DoRA mix: rare, the modules take it
        return None
    if x.device.type not in DEVICES or (dora and x.device.type not in DORA_DEVICES):
        return None
    if any(layer.in_features != x.shape[-1] or layer.weight.device != x.device for layer in layers):
        return None  # the modules raise their own error (or move nothing): not this unit's business
    adapters = [f[1] for f in found]
    factors = [t for a in adapters for t in (a.lora_A.weight, a.lora_B.weight)]
    if _ops.linear_route(x, q_proj.weight, q_proj.bias, trainable=factors, caller="lora_qkv") != _ops.ROUTE_DENSE:
        return None  # the modules' fused GEMV/GEMM read each 4-bit weight once; this unit dequantizes
    biases = tuple(layer.bias for layer in layers)
    a_s, b_s = tuple(a.lora_A.weight for a in adapters), tuple(a.lora_B.weight for a in adapters)
    if dora:
        specs = tuple((_weight_args(layer.weight), float(a.scale)) for layer, a in zip(layers, adapters))
        mags = tuple(a.lora_magnitude_vector for a in adapters)
        extras = tuple((m, a.weight_sq_norm(layer)) for m, a, layer in zip(mags, adapters, layers))
        unit = _DoRAQKVConcat if x.device.type in DORA_CONCAT_DEVICES else _DoRAQKV
        return unit.apply(x, specs, extras, *biases, *a_s, *b_s, *mags)
    specs = tuple(_weight_args(layer.weight) for layer in layers)
    scales = tuple(float(a.scale) for a in adapters)
    return _LoRAQKV.apply(x, specs, scales, CONCAT_WEIGHTS, *biases, *a_s, *b_s)


# ---- wiring into attention modules ----------------------------------------------------------------


def _hf_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """transformers' matched attention forward (fused_blocks.hf_attention) with q/k/v from the unit,
    RoPE fused where fused_block_ops is on for this device; the forward it replaced otherwise."""
    qkv = None
    if position_embeddings is not None and position_embeddings[0].shape[-1] == self.head_dim:
        qkv = lora_qkv(hidden_states, self.q_proj, self.k_proj, self.v_proj)
    if qkv is None:
        return self._qlora_unfused_forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    cache, kwargs = fused_blocks.pop_cache(args, kwargs)
    residual = kwargs.pop("_qlora_residual", None)  # a fused decoder layer's (fused_blocks)
    fused_rope = hidden_states.device.type in getattr(self, "_qlora_fused_devices", ())
    return fused_blocks.hf_attention(self, self._qlora_qkv_spec, hidden_states, position_embeddings, attention_mask,
                                     cache, kwargs, projections=qkv, fused_rope=fused_rope, residual=residual)  # fmt: skip


def _tiny_projections(self, x):
    qkv = lora_qkv(x, self.q_proj, self.k_proj, self.v_proj)
    return type(self).projections(self, x) if qkv is None else qkv


def _candidates(model: nn.Module) -> list[tuple[nn.Module, str, object, object]]:
    """(module, attribute, function, spec) for each attention module whose q/k/v are QLoRA layers."""
    from .builtin import tiny_llama

    found = []
    for m in model.modules():
        if not all(isinstance(getattr(m, n, None), QLoRALinear) for n in ("q_proj", "k_proj", "v_proj")):
            continue
        if isinstance(m, tiny_llama.Attention):
            found.append((m, "projections", _tiny_projections, None))
            continue
        cls = type(m)
        if not cls.__module__.startswith("transformers.models."):
            continue
        kind, spec = fused_blocks._hf_kind(cls)
        if kind == "attention":
            found.append((m, "forward", _hf_forward, spec))
        else:
            fused_blocks._log_skip_once(cls, spec)
    return found


def enable_fused_qkv(model: nn.Module) -> int:
    """Route the q/k/v projections of every Llama-family attention of `model` (transformers' Llama,
    Mistral, Qwen2, Qwen3 as fused_blocks matches them; the builtin TinyLlama) whose q/k/v are QLoRA
    layers through `lora_qkv` (instance-level; the class is untouched). Returns how many attention
    modules were switched (those already switched are not counted)."""
    count = 0
    for module, attribute, function, spec in _candidates(model):
        if is_fused_qkv(module):
            continue
        if attribute == "forward":
            # whatever forward is in place (the class's, or fused_block_ops' instance forward) is
            # the fallback; fused_block_ops enabled later sets its forward there (fused_blocks).
            module._qlora_unfused_forward = module.forward
            module._qlora_qkv_spec = spec
        module.__dict__[attribute] = types.MethodType(function, module)
        count += 1
    return count


def is_fused_qkv(module: nn.Module) -> bool:
    """Whether `module` computes q/k/v through the fused unit (enable_fused_qkv)."""
    return any(getattr(module.__dict__.get(name), "__func__", None) is f
               for name, f in (("forward", _hf_forward), ("projections", _tiny_projections)))  # fmt: skip


def disable_fused_qkv(model: nn.Module) -> int:
    """Undo enable_fused_qkv: each attention module gets back the forward the unit replaced (the
    class's, or fused_block_ops' instance forward). Returns how many were restored."""
    restored = 0
    for module in model.modules():
        if not is_fused_qkv(module):
            continue
        if "projections" in module.__dict__:
            del module.__dict__["projections"]
        else:
            fallback = module.__dict__.pop("_qlora_unfused_forward")
            module.__dict__.pop("_qlora_qkv_spec", None)
            if getattr(fallback, "__func__", None) is type(module).forward:
                module.__dict__.pop("forward", None)  # the class's own forward shows through
            else:
                module.forward = fallback
        restored += 1
    return restored
