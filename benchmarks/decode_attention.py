"""Decode-attention kernel variants on one GPU: checked against float64, timed with CUDA events (medians).

The engine's kernel (actors/engines/decode_attention.py, matrix units, query group padded to 16 rows) over a
sweep of its launch settings (keys per block, warps, pipeline stages, context splits), with the settings
the engine picks marked, against a variant on the CUDA cores (`_fma_kernel` below: no padding, products as
broadcasts), at the engine benchmark's batch (256 slots, contexts 128..384) and each shape's heads. The
floor is the keys and values read once, at the device-to-device copy bandwidth.

    python benchmarks/decode_attention.py [--shape llama-3.2-1b smollm2-135m qwen2.5-0.5b]
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

from actors.engines.decode_attention import LOG2E, Launch, decode_attention, launch_settings  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402


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


def sweep(name: str, bandwidth: float, slots: int = 256, window: int = 392) -> None:
    c = SHAPES[name]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    dim = c["hidden_size"] // heads
    group = heads // kv_heads
    # Several layers' caches in rotation, so repeated runs do not read from L2.
    caches = [(torch.randn(slots, kv_heads, window, dim, device="cuda", dtype=torch.bfloat16),
               torch.randn(slots, kv_heads, window, dim, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
    q = torch.randn(slots, heads, dim, device="cuda", dtype=torch.bfloat16)
    lengths = torch.randint(128, 384, (slots,), device="cuda")
    nbytes = int(lengths.sum()) * kv_heads * dim * 2 * 2
    k0, v0 = caches[0]
    ref = torch.stack([torch.softmax((q[b].double()[:, None] @ k0[b, :, :n].double().repeat_interleave(group, 0)
                                      .transpose(1, 2))[:, 0] / dim**0.5, -1)[:, None]
                       .matmul(v0[b, :, :n].double().repeat_interleave(group, 0))[:, 0]
                       for b, n in enumerate(lengths.tolist())])
    picked = launch_settings(slots, kv_heads, group, torch.device("cuda"))
    settings = sorted({Launch(bn, w, st, sp) for bn in (32, 64, 128) for w in (2, 4) for st in (2, 3)
                       for sp in (1, 2)} | {picked})
    variants = {key: (lambda k, v, key=key: decode_attention(q, k, v, lengths, **key._asdict())) for key in settings}
    if group & (group - 1) == 0:  # the CUDA-core variant's tl.arange needs a power-of-two group
        variants["CUDA-core kernel, block 16, 4 warps"] = lambda k, v: fma_attention(q, k, v, lengths, block_n=16)
    print(f"\n{name}: {slots} slots x {heads}/{kv_heads} heads x {dim}, contexts 128..384: {nbytes / 1e6:.1f} MB "
          f"per layer, floor {nbytes / bandwidth * 1e6:.1f} us; the engine picks (block, warps, stages, splits) "
          f"= {picked}")
    print(f"| {'variant (block, warps, stages, splits)':<44} | {'rel. error':>10} | {'us':>7} | {'of copy BW':>10} |")
    print(f"|{'-' * 46}|{'-' * 12}|{'-' * 9}|{'-' * 12}|")
    results = []
    for key, fn in variants.items():
        err = ((fn(k0, v0).double() - ref).norm() / ref.norm()).item()
        i = iter(range(1 << 30))
        ms = cuda_ms(lambda: fn(*caches[next(i) % len(caches)]))
        results.append((ms, key, err))
    for ms, key, err in sorted(results, key=lambda r: r[0]):
        label = (f"{tuple(key)}{' <- the engine' if key == picked else ''}" if isinstance(key, Launch) else key)
        print(f"| {label:<44} | {err:10.2e} | {ms * 1e3:7.1f} | {nbytes / (ms / 1e3) / bandwidth:10.0%} |")


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=["llama-3.2-1b", "smollm2-135m", "qwen2.5-0.5b"], choices=SHAPES)
    args = ap.parse_args()
    torch.manual_seed(0)
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / (cuda_ms(lambda: dst.copy_(src), 20) / 1e3)
    del src, dst
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s; torch {torch.__version__}, "
          f"triton {triton.__version__}")
    for name in args.shape:
        sweep(name, bandwidth)


if __name__ == "__main__":
    main()
