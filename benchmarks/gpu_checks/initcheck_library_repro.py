"""No qlora_ext code: does compute-sanitizer's initcheck flag reads of memory written by cuBLAS /
cuDNN kernels on the H100? (Each case creates its inputs with randn, then reads a library output.)"""
import sys
import torch
import torch.nn.functional as F

case = sys.argv[1]
torch.manual_seed(0)
if case == "matmul_bf16":
    a = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    y = a @ b.T
    z = y.clone()  # a plain device-to-device copy of cuBLAS' output
elif case == "linear_small":
    a = torch.randn(6, 32, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(40, 32, device="cuda", dtype=torch.bfloat16)
    z = (a @ w.T).clone()
elif case == "sdpa":
    q = torch.randn(2, 8, 128, 64, device="cuda", dtype=torch.bfloat16)
    z = F.scaled_dot_product_attention(q, q, q, is_causal=True).clone()
elif case == "randn_only":
    z = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16).clone()
torch.cuda.synchronize()
print(case, "done", float(z.float().sum()))
