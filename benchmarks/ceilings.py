"""Device ceilings the GPU benchmarks measure in their own run (METHOD: measure the two ceilings once on the
device, and compare against those rather than datasheet rates)."""

from __future__ import annotations

import statistics
import time

import torch


def matmul_ceiling(device: str, n: int, repeats: int = 20) -> float:
    """FLOP/s of an n^3 matmul (bf16 on GPU, float32 on CPU) on random data, median; three input sets in turn."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    inputs = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
              for _ in range(3)]
    times = []
    for i in range(repeats + 5):
        a, b = inputs[i % 3]
        times.append(timed(device, lambda: a @ b))
    return 2 * n**3 / statistics.median(times[5:])


def timed(device: str, fn) -> float:
    """Seconds of fn(), by CUDA events on the GPU (fn's own host syncs included) or the host clock on the CPU."""
    if device != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3
