"""Weight export for refit: parameters under Hugging Face names, packed into large flat buckets.

Wire format (read by actors/engines/weights.py; plain data so the two sides share no code): a bucket is a
dict with `names`, `dtypes` (torch dtype names), `shapes`, `offsets` (bytes, 64-aligned) and `data`, a
uint8 numpy array holding the tensors back to back. Through Ray's object store, `data` arrives on every
replica as a zero-copy view of shared memory.

A bucket's *layout* is the same dict without `data` and with `nbytes` (the bucket's size): the collective
transport sends layouts once and then only the bytes (learner/refit_source.py).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

ALIGN = 64
DEFAULT_BUCKET_BYTES = 256 << 20


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def bucket_layout(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                  dtype: str | None = None) -> list[dict]:
    """Group tensors into buckets of about `bucket_bytes` (a larger tensor gets a bucket of its own).
    `dtype` (a torch dtype name) is the dtype every entry travels in; None keeps each tensor's own."""
    layout: list[dict] = []
    for name, tensor in named:
        entry_dtype = dtype or str(tensor.dtype).removeprefix("torch.")
        nbytes = _aligned(math.prod(tensor.shape) * getattr(torch, entry_dtype).itemsize)
        if not layout or (layout[-1]["names"] and layout[-1]["nbytes"] + nbytes > bucket_bytes):
            layout.append({"names": [], "dtypes": [], "shapes": [], "offsets": [], "nbytes": 0})
        bucket = layout[-1]
        bucket["names"].append(name)
        bucket["dtypes"].append(entry_dtype)
        bucket["shapes"].append(tuple(tensor.shape))
        bucket["offsets"].append(bucket["nbytes"])
        bucket["nbytes"] += nbytes
    return layout


def pack_entries(entry: dict, tensors: dict[str, torch.Tensor], out: torch.Tensor) -> None:
    """Copy (and cast) the tensors of one layout entry into `out`, a uint8 tensor of entry["nbytes"] bytes."""
    for name, dtype, shape, offset in zip(entry["names"], entry["dtypes"], entry["shapes"], entry["offsets"]):
        nbytes = math.prod(shape) * getattr(torch, dtype).itemsize
        out[offset : offset + nbytes].view(getattr(torch, dtype)).view(shape).copy_(tensors[name])


def pack_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[dict]:
    """The buckets of `bucket_layout` with their bytes, in host memory (the object-store transport)."""
    tensors = {name: t.detach() for name, t in named}
    buckets = []
    with torch.no_grad():
        for entry in bucket_layout(tensors.items(), bucket_bytes):
            data = np.zeros(entry["nbytes"], dtype=np.uint8)
            pack_entries(entry, {n: tensors[n].to("cpu") for n in entry["names"]}, torch.from_numpy(data))
            buckets.append({**{k: v for k, v in entry.items() if k != "nbytes"}, "data": data})
    return buckets
