"""Decode-attention kernel variants on one GPU: checked against float64, timed with CUDA events (medians).

The engine's kernel (actors/engines/decode_attention.py, matrix units, query group padded to 16 rows)
against a variant on the CUDA cores (`_fma_kernel` below: no padding, products as broadcasts), over the
engine benchmark's shape (256 slots, Llama-3.2-1B heads, contexts 128..384). The floor is the keys and
values read once, at the device-to-device copy bandwidth.

    python benchmarks/decode_attention.py
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.engines.decode_attention import LOG2E, decode_attention  # noqa: E402


@triton.jit
def _fma_kernel(Q, K, V, O, LENGTHS, qk_scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_ks,
                stride_ob, stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    slot = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(Q + slot * stride_qb + heads[:, None] * stride_qh + d[None, :]).to(tl.float32)
    length = tl.load(LENGTHS + slot)
    m_i = tl.full([GROUP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP], dtype=tl.float32)
    acc = tl.zeros([GROUP, HEAD_DIM], dtype=tl.float32)
    base = slot * stride_kb + kv_head * stride_kh
    for start in range(0, length, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        ok = n < length
        k = tl.load(K + base + n[:, None] * stride_ks + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = tl.load(V + base + n[:, None] * stride_ks + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + slot * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty))


def fma_attention(q, k, v, lengths, block_n=32, num_warps=4):
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    _fma_kernel[(q.shape[0], k.shape[1])](q, k, v, out, lengths, LOG2E / math.sqrt(q.shape[2]), q.stride(0),
                                          q.stride(1), k.stride(0), k.stride(1), k.stride(2), out.stride(0),
                                          out.stride(1), GROUP=group, HEAD_DIM=q.shape[2], BLOCK_N=block_n,
                                          num_warps=num_warps)
    return out


def cuda_ms(fn, repeats=100, warmup=10):
    times = []
    for i in range(warmup + repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    slots, heads, kv_heads, dim, window = 256, 32, 8, 64, 392
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / (cuda_ms(lambda: dst.copy_(src), 20) / 1e3)
    # Several layers' caches in rotation, so repeated runs do not read from L2.
    caches = [(torch.randn(slots, kv_heads, window, dim, device="cuda", dtype=torch.bfloat16),
               torch.randn(slots, kv_heads, window, dim, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
    q = torch.randn(slots, heads, dim, device="cuda", dtype=torch.bfloat16)
    lengths = torch.randint(128, 384, (slots,), device="cuda")
    nbytes = int(lengths.sum()) * kv_heads * dim * 2 * 2
    k0, v0 = caches[0]
    ref = torch.stack([torch.softmax((q[b].double()[:, None] @ k0[b, :, :n].double().repeat_interleave(4, 0)
                                      .transpose(1, 2))[:, 0] / 8, -1)[:, None]
                       .matmul(v0[b, :, :n].double().repeat_interleave(4, 0))[:, 0]
                       for b, n in enumerate(lengths.tolist())])
    variants = {f"engine kernel, block {bn}, {w} warps, {st} stages":
                (lambda k, v, bn=bn, w=w, st=st: decode_attention(q, k, v, lengths, block_n=bn, num_warps=w,
                                                                  num_stages=st))
                for bn, w, st in [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3)]}
    lengths32 = lengths.to(torch.int32)
    variants.update({f"engine kernel, int32 lengths, block {bn}, {w} warps, {st} stages":
                     (lambda k, v, bn=bn, w=w, st=st: decode_attention(q, k, v, lengths32, block_n=bn, num_warps=w,
                                                                       num_stages=st))
                     for bn, w, st in [(64, 4, 3), (32, 4, 3)]})
    variants.update({f"engine kernel, {sp} splits, block 64, 4 warps, 3 stages":
                     (lambda k, v, sp=sp: decode_attention(q, k, v, lengths, splits=sp)) for sp in (2, 4)})
    variants.update({f"CUDA-core kernel, block {bn}, {w} warps":
                     (lambda k, v, bn=bn, w=w: fma_attention(q, k, v, lengths, block_n=bn, num_warps=w))
                     for bn, w in [(16, 4)]})
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"{slots} slots x {heads}/{kv_heads} heads x {dim}, contexts 128..384: {nbytes / 1e6:.0f} MB per layer, "
          f"floor {nbytes / bandwidth * 1e6:.1f} us")
    print(f"| {'variant':<58} | {'rel. error':>10} | {'us':>7} | {'GB/s':>6} | {'of copy BW':>10} |")
    print(f"|{'-' * 60}|{'-' * 12}|{'-' * 9}|{'-' * 8}|{'-' * 12}|")
    for name, fn in variants.items():
        err = ((fn(k0, v0).double() - ref).norm() / ref.norm()).item()
        i = iter(range(1 << 30))
        ms = cuda_ms(lambda: fn(*caches[next(i) % len(caches)]))
        print(f"| {name:<58} | {err:10.2e} | {ms * 1e3:7.1f} | {nbytes / ms / 1e6:6.0f} | "
              f"{nbytes / (ms / 1e3) / bandwidth:10.0%} |")


if __name__ == "__main__":
    main()
