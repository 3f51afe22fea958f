"""Batched token sampling on the device, reproducible per request.

Every row is processed independently (sort, softmax, cumsum and search are row-wise) and its one uniform
random number comes from a counter-based hash of (request seed, step index). So a request's tokens depend
only on its own logits, parameters and seed: never on which other requests share the batch or on their
order, and no per-sequence torch.Generator is needed. (Bitwise-identical *logits* across batch
compositions are a property of the model kernels, not of this module.)
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
# Multipliers below 2**31 applied to values below 2**32 keep every product below 2**63, so the whole
# hash runs in int64 on any device without overflow.
_MUL1 = 0x7FEB352D
_MUL2 = 0x68E31DA5
_SEED_SALT = 0x9E3779B9


def split_seed(seed: int) -> tuple[int, int]:
    """A Python int seed -> (low, high) 32-bit words of its 64-bit two's-complement value."""
    return seed & MASK32, (seed >> 32) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mixer (lowbias32-style) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & MASK32
    return x ^ (x >> 16)


def counter_uniform(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One float32 uniform in [0, 1) per row, a pure function of (seed, step). All inputs int64 [B]."""
    h = _mix32(seed_lo ^ _SEED_SALT)
    h = _mix32(h ^ seed_hi)
    h = _mix32(h ^ (step & MASK32))
    # 24 bits: exactly representable in float32, so u < 1 always.
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed_lo: torch.Tensor,
    seed_hi: torch.Tensor,
    step: torch.Tensor,
    *,
    all_greedy: bool = False,
) -> torch.Tensor:
    """Pick one token per row.

    logits [B, V] in any float dtype; temperature/top_p [B] float32; top_k/seed_lo/seed_hi/step [B] int64.
    Rows with temperature == 0 take the argmax; the others apply temperature, then top-k (0 = off), then
    top-p on the renormalised top-k distribution, then inverse-CDF sampling with the row's uniform.
    """
    greedy = logits.argmax(dim=-1)  # upcasting is exact, so argmax needs no float32 copy
    if all_greedy:
        return greedy
    logits = logits.float()
    vocab = logits.shape[-1]
    is_greedy = temperature <= 0
    temp = torch.where(is_greedy, torch.ones_like(temperature), temperature)

    # Stable sort: ties keep vocabulary order, so the result never depends on the kernel's tie handling.
    sorted_logits, sorted_ids = (logits / temp[:, None]).sort(dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(dim=-1)
    rank = torch.arange(vocab, device=logits.device)

    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    keep = rank[None, :] < k[:, None]
    probs = probs * keep
    probs = probs / probs.sum(dim=-1, keepdim=True)
    # Keep a token while the mass strictly before it is below top_p (the top token always survives).
    mass_before = probs.cumsum(dim=-1) - probs
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)

    cdf = (probs * keep).cumsum(dim=-1)
    u = counter_uniform(seed_lo, seed_hi, step)
    target = (u * cdf[:, -1])[:, None].contiguous()
    # First index whose cdf exceeds the target; clamp guards float rounding at the top end.
    idx = torch.searchsorted(cdf.contiguous(), target, right=True)
    idx = torch.minimum(idx, keep.sum(dim=-1, keepdim=True) - 1)
    sampled = sorted_ids.gather(1, idx)[:, 0]
    return torch.where(is_greedy, greedy, sampled)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the unscaled model distribution: [B, V], [B] -> [B] float32."""
    return logits.float().log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]
