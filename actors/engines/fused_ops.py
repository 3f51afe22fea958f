"""Fused elementwise kernels for the GPU engine (Triton): RMSNorm with the residual add, SwiGLU's
silu(gate) * up, and the rotary embedding with the key/value cache write (a decode step's token per slot,
or a prefill's every prompt token).

Why: a decode step of a small model at a large batch spends as long in tiny elementwise kernels as in its
matrix products: eager RMSNorm alone is seven kernels (upcast, square, mean, rsqrt, scale, downcast, weight),
each reading and writing the whole activation. One kernel per row does it in a single pass. The rounding
follows the eager modules exactly (`llama.RMSNorm`, the bf16 residual add, `F.silu(gate) * up`): float32
inside, the model dtype at the same points.

Tests run these on CPU through Triton's interpreter (float32/float16) and on the GPU in bfloat16.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine uses the eager modules there
    triton = None


if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(X, R, W, OUT, SUM, eps, n_cols, stride_x, stride_r, stride_o, stride_s,
                            HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            # The sum is rounded to the model dtype before normalising, as the eager `x + residual` is.
            x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32))
            x = x.to(SUM.dtype.element_ty)
            tl.store(SUM + row * stride_s + cols, x, mask=ok)
        h = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        normed = (h * rstd).to(OUT.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + row * stride_o + cols, (w * normed).to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_kernel(GATE_UP, OUT, n_cols, stride_g, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        gate = tl.load(GATE_UP + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(GATE_UP + row * stride_g + n_cols + cols, mask=ok, other=0.0)
        # Eager rounds silu(gate) to the model dtype before the product; so does this.
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        tl.store(OUT + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=ok)


    @triton.jit
    def _rope_cache_kernel(QKV, SLOTS, POSITIONS, COS, SIN, Q_OUT, K_OUT, K_CACHE, V_CACHE, stride_qkv, stride_qo_n,
                           stride_qo_h, stride_ko_n, stride_ko_h, stride_cb, stride_ch, stride_cs, stride_rope,
                           HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                           HAS_SLOTS: tl.constexpr, HAS_K_OUT: tl.constexpr):
        token = tl.program_id(0)
        r = tl.arange(0, ROWS)  # q heads, then k heads, then v heads
        d = tl.arange(0, HEAD_DIM)
        half: tl.constexpr = HEAD_DIM // 2
        is_q = r < HEADS
        is_k = (r >= HEADS) & (r < HEADS + KV_HEADS)
        is_v = (r >= HEADS + KV_HEADS) & (r < HEADS + 2 * KV_HEADS)
        valid = (is_q | is_k | is_v)[:, None]
        base = QKV + token * stride_qkv + r[:, None] * HEAD_DIM
        x = tl.load(base + d[None, :], mask=valid, other=0.0)
        # rotate_half: (-x2, x1) for x = (x1, x2) halves
        partner = tl.load(base + ((d + half) % HEAD_DIM)[None, :], mask=valid, other=0.0)
        rotated = tl.where((d < half)[None, :], -partner.to(tl.float32), partner.to(tl.float32)).to(x.dtype)
        pos = tl.load(POSITIONS + token)
        # The eager path rounds cos/sin to the model dtype and rounds after each product and the sum.
        cos = tl.load(COS + pos * stride_rope + d).to(x.dtype).to(tl.float32)
        sin = tl.load(SIN + pos * stride_rope + d).to(x.dtype).to(tl.float32)
        a = (x.to(tl.float32) * cos[None, :]).to(x.dtype).to(tl.float32)
        b = (rotated.to(tl.float32) * sin[None, :]).to(x.dtype).to(tl.float32)
        roped = (a + b).to(x.dtype)
        tl.store(Q_OUT + token * stride_qo_n + r[:, None] * stride_qo_h + d[None, :], roped, mask=is_q[:, None])
        kv_head = tl.where(is_k, r - HEADS, r - HEADS - KV_HEADS)
        if HAS_K_OUT:  # prefill attends over the new keys themselves
            tl.store(K_OUT + token * stride_ko_n + kv_head[:, None] * stride_ko_h + d[None, :], roped,
                     mask=is_k[:, None])
        slot = tl.load(SLOTS + token) if HAS_SLOTS else token
        cache = slot * stride_cb + kv_head[:, None] * stride_ch + pos * stride_cs + d[None, :]
        tl.store(K_CACHE + cache, roped, mask=is_k[:, None])
        tl.store(V_CACHE + cache, x, mask=is_v[:, None])


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
                   slots: torch.Tensor | None = None, keys: bool = False):
    """Rotary embedding and the key/value cache write of N tokens in one kernel: qkv [N, (H + 2 H_kv) * D] ->
    rotated queries [N, H, D]; the rotated key and the value go into k_cache/v_cache ([slots, H_kv, S, D], one
    layer) at each token's position, in cache slot `slots[n]` (None: slot n, one decode token per slot).
    `keys`: also return the rotated keys [N, H_kv, D] (prefill attends over them). cos/sin: the float32
    tables [S, D]."""
    n = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    if qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("rope_and_cache needs unit stride along D and k/v caches of one layout")
    q = torch.empty(n, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(n, kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device) if keys else q
    _rope_cache_kernel[(n,)](
        qkv, positions if slots is None else slots, positions, cos, sin, q, k, k_cache, v_cache, qkv.stride(0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        cos.stride(0), HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        ROWS=triton.next_power_of_2(heads + 2 * kv_heads), HAS_SLOTS=slots is not None, HAS_K_OUT=keys,
        num_warps=4)
    return (q, k) if keys else q


def _rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        raise ValueError("fused ops need unit stride along the last dimension")
    return flat


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rmsnorm(x + residual) * weight); without `residual`, (x, rmsnorm(x) * weight)."""
    rows = _rows(x)
    out = torch.empty_like(rows)
    total = torch.empty_like(rows) if residual is not None else rows
    res = _rows(residual) if residual is not None else rows
    _add_rmsnorm_kernel[(rows.shape[0],)](
        rows, res, weight, out, total, eps, rows.shape[1], rows.stride(0), res.stride(0), out.stride(0),
        total.stride(0), HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(rows.shape[1]),
        num_warps=4 if rows.shape[1] <= 4096 else 8)
    return total.view(x.shape), out.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [..., 2 * n] holding gate then up."""
    rows = _rows(gate_up)
    n = rows.shape[1] // 2
    out = torch.empty(rows.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](rows, out, n, rows.stride(0), out.stride(0),
                                                              BLOCK=block, num_warps=4)
    return out.view(*gate_up.shape[:-1], n)
