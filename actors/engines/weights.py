"""The refit wire format: named tensors packed back to back in one uint8 buffer (`WeightBucket`), and its
layout (the same without the bytes) for buffers that arrive by collective broadcast."""

from __future__ import annotations

import math
import warnings
from typing import Iterator, Mapping

import numpy as np
import torch

from actors.engines.protocol import WeightBucket

ALIGNMENT = 64  # bytes; keeps every entry aligned for any dtype view and for vectorised copies

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported weight dtype {name!r}; supported: {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    torch_dtype(name)  # validates
    return name


def entry_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch_dtype(dtype).itemsize


def _bytes_view(data: np.ndarray) -> torch.Tensor:
    """A uint8 tensor sharing memory with `data` (which may be read-only shared memory)."""
    if data.dtype != np.uint8 or data.ndim != 1 or not data.flags.c_contiguous:
        raise ValueError(f"bucket data must be a contiguous 1-D uint8 array, got {data.dtype} {data.shape}")
    if data.size == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        # Read-only buffers (Ray's object store) warn that writes would be undefined; we only read.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.frombuffer(data, dtype=torch.uint8)


def layout_spans(entry: Mapping, size: int) -> Iterator[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
    """(name, dtype, shape, offset, nbytes) of each entry of one bucket layout (names, dtypes, shapes,
    offsets) over a `size`-byte buffer; ValueError for a malformed entry."""
    names = entry["names"]
    if not (len(entry["dtypes"]) == len(entry["shapes"]) == len(entry["offsets"]) == len(names)):
        raise ValueError("bucket names/dtypes/shapes/offsets have different lengths")
    seen: set[str] = set()
    for name, dtype, shape, offset in zip(names, entry["dtypes"], entry["shapes"], entry["offsets"]):
        if name in seen:
            raise ValueError(f"bucket has {name!r} twice")
        seen.add(name)
        shape = tuple(shape)
        nbytes = entry_nbytes(dtype, shape)
        if offset % torch_dtype(dtype).itemsize:
            raise ValueError(f"bucket entry {name!r} at offset {offset} is not aligned to its {dtype} elements")
        if offset < 0 or offset + nbytes > size:
            raise ValueError(f"bucket entry {name!r} [{offset}, {offset + nbytes}) is outside the {size}-byte buffer")
        yield name, torch_dtype(dtype), shape, offset, nbytes


def entry_views(entry: Mapping, raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views into `raw` (a flat uint8 tensor on any device) of every entry of one bucket layout, by name."""
    return {name: raw[offset : offset + nbytes].view(dtype).view(shape)
            for name, dtype, shape, offset, nbytes in layout_spans(entry, raw.numel())}


def unpack_bucket(bucket: WeightBucket) -> dict[str, torch.Tensor]:
    """Zero-copy views of every entry of `bucket`, by name."""
    return entry_views(vars(bucket), _bytes_view(bucket.data))


def pack_tensors(named: dict[str, torch.Tensor]) -> WeightBucket:
    """Copy `named` into one fresh bucket, each entry at a 64-byte-aligned offset."""
    names, dtypes, shapes, offsets = [], [], [], []
    total = 0
    for name, t in named.items():
        names.append(name)
        dtypes.append(dtype_name(t.dtype))
        shapes.append(tuple(t.shape))
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGNMENT) * ALIGNMENT
    data = np.zeros(total, dtype=np.uint8)
    buffer = torch.from_numpy(data)
    for t, offset in zip(named.values(), offsets):
        flat = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
        buffer[offset : offset + flat.numel()].copy_(flat)
    return WeightBucket(names=names, dtypes=dtypes, shapes=shapes, offsets=offsets, data=data)
