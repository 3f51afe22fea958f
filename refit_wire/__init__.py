"""The refit wire format: the one piece the learner (which sends weights) and the engines (which load them)
share.

A bucket holds named tensors (Hugging Face names) back to back in one flat uint8 buffer: `names`, `dtypes`
(torch dtype names such as "bfloat16"), `shapes`, `offsets` (bytes, multiples of ALIGNMENT) and `data`, a
uint8 numpy array. Through Ray's object store it travels as a plain dict (the fields of `WeightBucket`) and
`data` arrives on every replica as a zero-copy, read-only view of shared memory.

A bucket's layout is the same dict without `data` and with `nbytes` (the bucket's size): the collective
transport sends the layouts once per group, then only the bytes of each bucket, over a standalone process
group (`open_group`) that meets at a TCPStore hosted by the source (`host_store`, `join_store`).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

ALIGNMENT = 64  # bytes; keeps every entry aligned for any dtype view and for vectorised copies
DEFAULT_BUCKET_BYTES = 256 << 20
GROUP_TIMEOUT = timedelta(minutes=10)  # a member that does not take part in a collective for this long fails it
STORE_PREFIX = "selfreward-refit"  # + the group's generation: a rebuilt group never reads an old group's keys

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class WeightBucket:
    """One bucket with its bytes. Entry i occupies data[offsets[i] : offsets[i] + entry_nbytes(dtypes[i],
    shapes[i])] and is viewed as `dtypes[i]` with shape `shapes[i]`."""

    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    data: np.ndarray = field(repr=False)


# A bucket's layout (the fields of a WeightBucket but `data`, plus `nbytes`) as a plain dict.
BucketLayout = Mapping[str, Any]


# ---- dtypes and sizes --------------------------------------------------------------------------------------


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


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


# ---- packing (the sending side) ----------------------------------------------------------------------------


def bucket_layout(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                  dtype: str | None = None) -> list[dict]:
    """Group tensors into buckets of about `bucket_bytes` (a larger tensor gets a bucket of its own).
    `dtype` (a dtype name) is the dtype every entry travels in; None keeps each tensor's own."""
    layout: list[dict] = []
    for name, tensor in named:
        entry_dtype = dtype or dtype_name(tensor.dtype)
        nbytes = _aligned(entry_nbytes(entry_dtype, tuple(tensor.shape)))
        if not layout or (layout[-1]["names"] and layout[-1]["nbytes"] + nbytes > bucket_bytes):
            layout.append({"names": [], "dtypes": [], "shapes": [], "offsets": [], "nbytes": 0})
        bucket = layout[-1]
        bucket["names"].append(name)
        bucket["dtypes"].append(entry_dtype)
        bucket["shapes"].append(tuple(tensor.shape))
        bucket["offsets"].append(bucket["nbytes"])
        bucket["nbytes"] += nbytes
    return layout


def pack_entries(entry: BucketLayout, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
    """Copy (and cast) the tensors of one layout entry into `out`, a uint8 tensor of entry["nbytes"] bytes."""
    for name, dtype, shape, offset in zip(entry["names"], entry["dtypes"], entry["shapes"], entry["offsets"]):
        nbytes = entry_nbytes(dtype, tuple(shape))
        out[offset : offset + nbytes].view(torch_dtype(dtype)).view(shape).copy_(tensors[name])


@torch.no_grad()
def pack_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[dict]:
    """The buckets of `bucket_layout` with their bytes, in host memory, as plain dicts (the object-store
    transport)."""
    tensors = {name: t.detach() for name, t in named}
    buckets = []
    for entry in bucket_layout(tensors.items(), bucket_bytes):
        data = np.zeros(entry["nbytes"], dtype=np.uint8)
        pack_entries(entry, {n: tensors[n].to("cpu") for n in entry["names"]}, torch.from_numpy(data))
        buckets.append({**{k: v for k, v in entry.items() if k != "nbytes"}, "data": data})
    return buckets


def pack_tensors(named: Mapping[str, torch.Tensor]) -> WeightBucket:
    """All of `named` in one bucket."""
    buckets = pack_buckets(named.items(), bucket_bytes=sys.maxsize)
    if not buckets:
        return WeightBucket(names=[], dtypes=[], shapes=[], offsets=[], data=np.zeros(0, dtype=np.uint8))
    return WeightBucket(**buckets[0])


# ---- views (the receiving side) ----------------------------------------------------------------------------


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


def layout_spans(entry: BucketLayout, size: int) -> Iterator[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
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


def entry_views(entry: BucketLayout, raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views into `raw` (a flat uint8 tensor on any device) of every entry of one bucket layout, by name."""
    return {name: raw[offset : offset + nbytes].view(dtype).view(shape)
            for name, dtype, shape, offset, nbytes in layout_spans(entry, raw.numel())}


def unpack_bucket(bucket: WeightBucket) -> dict[str, torch.Tensor]:
    """Zero-copy views of every entry of `bucket`, by name."""
    return entry_views(vars(bucket), _bytes_view(bucket.data))


# ---- the collective transport's group ----------------------------------------------------------------------


def host_store(host: str, timeout: timedelta = GROUP_TIMEOUT) -> dist.TCPStore:
    """A rendezvous store listening on `host` at a port the OS picks; members meet at (host, store.port).
    The store binds the port itself, so no other process can take it between picking and listening."""
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timeout)


def join_store(host: str, port: int, timeout: timedelta = GROUP_TIMEOUT) -> dist.TCPStore:
    """A client of the store that `host_store` made there."""
    return dist.TCPStore(host, port, is_master=False, timeout=timeout)


def open_group(store: dist.Store, generation: int, rank: int, size: int, backend: str):
    """A standalone process group over `store`, warmed up (NCCL creates its communicator on first use)."""
    prefixed = dist.PrefixStore(f"{STORE_PREFIX}/{generation}", store)
    if backend == "nccl":
        group = dist.ProcessGroupNCCL(prefixed, rank, size, GROUP_TIMEOUT)
        probe = torch.zeros(1, device="cuda")
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, size, GROUP_TIMEOUT)
        probe = torch.zeros(1)
    group.broadcast(probe, root=0).wait()
    if probe.is_cuda:
        torch.cuda.current_stream().synchronize()
    return group
