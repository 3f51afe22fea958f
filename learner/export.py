"""Weight export for refit: parameters under Hugging Face names, packed into large flat buckets.

Wire format (read by actors/engines/weights.py; plain data so the two sides share no code): a bucket is a
dict with `names`, `dtypes` (torch dtype names), `shapes`, `offsets` (bytes, 64-aligned) and `data`, a
uint8 numpy array holding the tensors back to back. Through Ray's object store, `data` arrives on every
replica as a zero-copy view of shared memory.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

ALIGN = 64
DEFAULT_BUCKET_BYTES = 256 << 20


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[dict]:
    """Group tensors into buckets of about `bucket_bytes` (a larger tensor gets a bucket of its own)."""
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in named:
        nbytes = _aligned(tensor.numel() * tensor.element_size())
        if groups[-1] and size + nbytes > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, tensor))
        size += nbytes
    return [_pack(group) for group in groups if group]


def _pack(group: list[tuple[str, torch.Tensor]]) -> dict:
    offsets, total = [], 0
    for _, t in group:
        offsets.append(total)
        total += _aligned(t.numel() * t.element_size())
    data = np.zeros(total, dtype=np.uint8)
    flat = torch.from_numpy(data)
    for (_, t), off in zip(group, offsets):
        src = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        flat[off : off + src.numel()].copy_(src)
    return {
        "names": [n for n, _ in group],
        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in group],
        "shapes": [tuple(t.shape) for _, t in group],
        "offsets": offsets,
        "data": data,
    }
