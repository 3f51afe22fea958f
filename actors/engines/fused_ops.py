"""Fused elementwise kernels for the GPU engine (Triton): RMSNorm with the residual add, and SwiGLU's
silu(gate) * up.

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


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


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
