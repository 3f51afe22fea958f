"""Decode attention on the GPU: one new query token per slot against that slot's cached keys, in Triton.

Why a kernel of our own: torch SDPA has no fast path for this case. A per-slot length needs a mask, and a
mask together with grouped-query attention sends SDPA to its math path, which materialises the keys and
values repeated for every query head and attends over the whole padded cache window: several times the
bytes the step must read. This kernel reads each slot's keys and values once, only up to its own length,
and serves all query heads of a key-value group from that one read.

One program per (slot, key-value head): the group's query heads (padded to 16 rows for the matrix units)
against key/value blocks of BLOCK_N positions, with an online softmax in float32 (flash-attention style).
Lengths come from device memory, so a captured CUDA graph stays valid as sequences grow.

Tests run it on CPU through Triton's interpreter (TRITON_INTERPRET=1, float32/float16 data: the interpreter
mishandles bfloat16 matrix products), and on the GPU machine in bfloat16 against SDPA.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine uses SDPA there
    triton = None

LOG2E = 1.4426950408889634


def available(device: torch.device) -> bool:
    """The kernel serves CUDA devices when Triton is installed."""
    return triton is not None and device.type == "cuda"


class Launch(NamedTuple):
    """How the kernel is launched: keys per block, warps and pipeline stages per program, context splits."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    splits: int = 1


def launch_settings(slots: int, kv_heads: int, group: int, device: torch.device) -> Launch:
    """The engine's launch settings for a decode step over `slots` slots (benchmarks/decode_attention.py sweeps
    the alternatives; benchmarks/NOTES.md has the figures)."""
    return Launch(splits=splits_for(slots * kv_heads, device))


def splits_for(programs: int, device: torch.device) -> int:
    """Context splits so that (slots x KV heads x splits) gives each multiprocessor at least one program.
    Splitting adds a second kernel and a float32 round trip: on an H200 at 256 slots it was slower for every
    shape measured, even at 512 programs (Qwen2.5-0.5B's 2 KV heads: 54 us unsplit, 144 us in two), so it
    only serves few slots, where one program per slot and head would leave multiprocessors idle."""
    if device.type != "cuda":
        return 1
    target = torch.cuda.get_device_properties(device).multi_processor_count
    splits = 1
    while splits < 8 and programs * splits < target:
        splits *= 2
    return splits


if triton is not None:

    @triton.jit
    def _attend_block(q, k_base, v_base, stride_ks, stride_vs, start, lo, hi, d, d_ok, m_i, l_i, acc, qk_scale,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, HAS_PAD: tl.constexpr):
        """One online-softmax update with the keys/values at positions [start, start + BLOCK_N) ∩ [lo, hi)."""
        n = start + tl.arange(0, BLOCK_N)
        n_ok = (n >= lo) & (n < hi)
        # Without padded lanes the mask is constant along D, which keeps the loads 16 bytes wide.
        kv_mask = n_ok[:, None] & d_ok[None, :] if HAS_PAD else n_ok[:, None]
        k = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
        # Scores in log2 units (qk_scale folds in log2(e)) so the softmax uses exp2.
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; exp2(-inf - -inf) would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        v = tl.load(v_base + n[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i * alpha + tl.sum(p, 1), acc

    @triton.jit
    def _decode_attention_kernel(
        Q, K, V, O, O_PART, LSE_PART, LENGTHS, qk_scale,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_ob,
        stride_oh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        SPLITS: tl.constexpr, KV_LEN: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        slot = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D_PAD)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        heads = kv_head * GROUP + g
        q = tl.load(Q + slot * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        length = tl.load(LENGTHS + slot)
        # This program's share of the slot's context: whole blocks, the last share possibly shorter or empty.
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, length)

        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
        k_base = K + slot * stride_kb + kv_head * stride_kh
        v_base = V + slot * stride_vb + kv_head * stride_vh
        # Compiled, the loop runs over [lo, hi) (run-time bounds Triton can software-pipeline). Triton's
        # interpreter (the CPU tests) cannot take a run-time value as a loop bound, so there it runs over
        # the whole window KV_LEN: blocks outside [lo, hi) are fully masked and change nothing (p = 0,
        # alpha = 1), so both compute the same result.
        if INTERPRETED:
            for start in range(0, KV_LEN, BLOCK_N):
                m_i, l_i, acc = _attend_block(q, k_base, v_base, stride_ks, stride_vs, start, lo, hi, d, d_ok,
                                              m_i, l_i, acc, qk_scale, BLOCK_N, PRECISION, D_PAD != HEAD_DIM)
        else:
            for start in range(lo, hi, BLOCK_N):
                m_i, l_i, acc = _attend_block(q, k_base, v_base, stride_ks, stride_vs, start, lo, hi, d, d_ok,
                                              m_i, l_i, acc, qk_scale, BLOCK_N, PRECISION, D_PAD != HEAD_DIM)
        out_mask = g_ok[:, None] & d_ok[None, :]
        if SPLITS == 1:
            out = acc / l_i[:, None]
            tl.store(O + slot * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                     mask=out_mask)
        else:
            # A partial result and its log2-sum-exp per head; an empty share has lse = -inf (weight 0).
            seen = l_i > 0
            out = acc / tl.where(seen, l_i, 1.0)[:, None]
            lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
            row = (slot * GROUP * tl.num_programs(1) + heads) * SPLITS + split
            tl.store(O_PART + row[:, None] * D_PAD + d[None, :], out, mask=out_mask)
            tl.store(LSE_PART + row, lse, mask=g_ok)

    @triton.jit
    def _combine_kernel(O, O_PART, LSE_PART, stride_ob, stride_oh, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        D_PAD: tl.constexpr, SPLITS: tl.constexpr):
        """Merge one (slot, head)'s SPLITS partial results, weighting each by its share of the softmax mass."""
        slot = tl.program_id(0)
        head = tl.program_id(1)
        sp = tl.arange(0, SPLITS)
        d = tl.arange(0, D_PAD)
        row = (slot * HEADS + head) * SPLITS + sp
        lse = tl.load(LSE_PART + row)
        weight = tl.exp2(lse - tl.max(lse, 0))
        part = tl.load(O_PART + row[:, None] * D_PAD + d[None, :])
        out = tl.sum(weight[:, None] * part, 0) / tl.sum(weight, 0)
        tl.store(O + slot * stride_ob + head * stride_oh + d, out.to(O.dtype.element_ty), mask=d < HEAD_DIM)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *,
                     splits: int = 1, block_n: int = 64, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """Attention of one query per slot over its first `lengths[b]` cached positions.

    q [B, H, D]; k, v [B, H_kv, W, D] (views of the cache window: any slot/head/position strides, unit
    stride in D); lengths [B] integers in [1, W]. Returns [B, H, D] in q's dtype. H must be a multiple of
    H_kv. `splits` (a power of two): programs per slot and KV head, each over a share of the context, merged
    by a second kernel (flash-decoding); more parallel work when slots are few or contexts long.
    """
    if triton is None:
        raise RuntimeError("decode_attention needs Triton (pip install triton)")
    b, h, d = q.shape
    kv_heads = k.shape[1]
    if h % kv_heads:
        raise ValueError(f"{h} query heads are not a multiple of {kv_heads} key-value heads")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("decode_attention needs unit stride along the head dimension")
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"splits must be a power of two, got {splits}")
    group = h // kv_heads
    d_pad = max(16, triton.next_power_of_2(d))
    out = torch.empty_like(q)
    o_part = lse_part = out  # unused with one split
    if splits > 1:
        o_part = torch.empty(b * h * splits, d_pad, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(b * h * splits, dtype=torch.float32, device=q.device)
    # float32 inputs take exact products (not TF32): the CPU-equivalent path must match eager attention.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    _decode_attention_kernel[(b, kv_heads, splits)](
        q, k, v, out, o_part, lse_part, lengths, LOG2E / math.sqrt(d),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        D_PAD=d_pad, SPLITS=splits, BLOCK_N=block_n, PRECISION=precision,
        # The window only bounds the interpreter's loop; compiled, one variant serves every window.
        KV_LEN=k.shape[2] if interpreted else 0, INTERPRETED=interpreted, num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        _combine_kernel[(b, h)](out, o_part, lse_part, out.stride(0), out.stride(1), HEADS=h, HEAD_DIM=d,
                                D_PAD=d_pad, SPLITS=splits, num_warps=1)
    return out
