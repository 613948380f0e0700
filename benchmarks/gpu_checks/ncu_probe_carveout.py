# one GEMV per variant at the decode shapes, then an RMSNorm: for ncu's launch__shared_mem_config_size
import os, torch, qlora_ext
from qlora_ext import _ops as ops
x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
q = qlora_ext.NF4Weight.from_float(torch.randn(4096, 4096, device="cuda") * 0.05, 64, True)
for v in ["factored_fill", "ring"]:
    ops.set_nf4_gemv_variant(v)
    for _ in range(2): ops.nf4_gemv_weight(x, q)
torch.cuda.synchronize()
