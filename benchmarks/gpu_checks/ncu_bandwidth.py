"""DRAM bandwidth of the M = 1 GEMV against a device copy, both under Nsight Compute (#5's 80% criterion).

    ncu --profile-from-start off --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
        python benchmarks/gpu_checks/ncu_bandwidth.py [--variants ring,factored_fill] [--shape 28672x8192]

Only the launches between cudaProfilerStart and Stop are profiled: two 1 GiB copies by an elementwise
kernel (x * 1 into another fp32 tensor: bench_nf4_linear's copy_bandwidth times a Tensor.copy_, which
is a memcpy that ncu does not profile, as session 24's first run showed) and two GEMV calls per
variant at M = 1, bf16. Each kernel's bandwidth is (DRAM bytes read + written) / its duration, under
ncu's clocks for both, so the ratio compares like with like. The second launch of each is the one to
read. (Session 24, H100: the ring read 121.2 MB in 63.3-63.8 us under ncu, 1.9 TB/s, against 51.6 us
in bench_nf4_linear's graph timing.)
"""

import argparse
import sys

import torch

import qlora_ext
from qlora_ext import ops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="ring,factored_fill")
    parser.add_argument("--shape", default="28672x8192")
    args = parser.parse_args()
    N, K = (int(v) for v in args.shape.split("x"))
    q = qlora_ext.NF4Weight.from_float(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02,
                                       blocksize=64, double_quant=True)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    src = torch.zeros(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    for variant in args.variants.split(","):  # warm: module loads, table set-up
        ops.set_nf4_gemv_variant(variant)
        ops.nf4_linear_forward(x, q)
    torch.mul(src, 1.0, out=dst)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _ in range(2):
        torch.mul(src, 1.0, out=dst)
    for variant in args.variants.split(","):
        ops.set_nf4_gemv_variant(variant)
        for _ in range(2):
            ops.nf4_linear_forward(x, q)
        torch.cuda.synchronize()
        print(f"profiled {variant} {N}x{K} M=1 ({q.nbytes / 1e6:.1f} MB of weight)", flush=True)
    torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
