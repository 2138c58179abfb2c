"""Dense attention through the compiled CPU kernel vs SDPA, one call timed alone (min of --repeats), as in
BENCHMARKS §1a-vi's tuning figures:

    python samples/time_cpu_kernel_dense.py --dtype bfloat16                 # 8192 tokens, 8 heads x 64
    python samples/time_cpu_kernel_dense.py --dtype float32 --heads 6 --head-dim 24

It prints the kernel's path (`cpu_kernel.status()`), the max abs difference to SDPA, then both times. Figures of the
kernel's intermediate versions in BENCHMARKS came from this measurement on builds of those sources (not kept)."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sparsediff.kernels import cpu_kernel
from sparsediff.runtime import _scratch_named


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if cpu_kernel.load() is None:
        raise SystemExit(f"the compiled CPU kernel did not load here: {cpu_kernel.reason()}")
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.seq_len, args.head_dim, generator=g).to(dtype) for _ in range(3))
    print(f"kernel: {cpu_kernel.status()}")
    err = (cpu_kernel.dense_attention(q, k, v).float() - F.scaled_dot_product_attention(q, k, v).float()).abs().max()
    print(f"max abs difference to SDPA: {err.item():.1e}")
    kernel = best_ms(lambda: cpu_kernel.dense_attention(q, k, v), args.repeats)
    sdpa = best_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
    print(f"dense through the kernel {kernel:.1f} ms, SDPA {sdpa:.1f} ms ({kernel / sdpa:.2f}x SDPA's time)")
    if dtype != torch.float32 and cpu_kernel.native(dtype):
        scratch = _scratch_named("layer")  # buffers kept across calls, as the runtime keeps them
        prep = best_ms(lambda: cpu_kernel.prepare(q, k, v, scratch), args.repeats)
        cpu_kernel._state["native"][dtype] = False  # the same call widened to float32 (as SPARSEDIFF_CPU_KERNEL_16BIT=0)
        try:
            wide = best_ms(lambda: cpu_kernel.dense_attention(q, k, v), args.repeats)
        finally:
            cpu_kernel._state["native"][dtype] = True
        print(f"the same through the float32 compute {wide:.1f} ms; the 16-bit entry's prepare (packing) {prep:.2f} ms")


if __name__ == "__main__":
    main()
