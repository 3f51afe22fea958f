"""Preallocated, slot-based KV cache.

Layout: two tensors, ``k`` and ``v``, each of shape

    [num_layers, max_batch_size, num_kv_heads, max_seq_len, head_dim]

allocated once when the engine starts and never resized. Dimension 1 is the *slot*: every running
sequence owns one slot for its whole life, and position ``p`` of that sequence lives at
``[:, slot, :, p, :]``. The cache itself stores no lengths; the engine tracks each slot's position and
passes it in, so a freed slot is reused simply by prefilling over it (stale entries beyond the new
sequence's position are never attended to: decode admits only keys at positions <= the query's own,
through a mask on the SDPA path and per-slot lengths in the Triton kernel).

Two write paths:

* prefill (``write_prefill``): a batch of new prompts, right-padded to a common length T, writes
  positions [0, T) of the slots it was given (positions past a prompt's length hold padding garbage and are
  overwritten by later decode steps before they can be attended to);
* decode (``write_decode``): one token per slot for the leading slots [0, B), written at a per-slot
  position given as a tensor, with an in-place ``scatter_``.

Decode only touches the contiguous prefix of slots [0, B) (the engine hands out the lowest free slot
first), so reads are views, not gathers, and every shape in a decode step depends only on (B, kv_len).
That is what lets the GPU path (cuda_graphs.py) capture one CUDA graph per (B rounded up to a power of
two, kv_len = `decode_window`: a power of two of at least 256, at most max_seq_len) and replay it with
tokens and positions fed through static tensors.

Size: the cache is sized from a memory budget, not from the worst case (`plan_cache`). One slot holds a
whole context, ``2 (k, v) x num_layers x num_kv_heads x max_seq_len x head_dim`` elements, so the engine
gets ``min(max_batch_size, budget // bytes_per_slot)`` slots; requests beyond them wait for a free slot
(continuous batching), and results do not depend on the slot count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.engines import DEFAULT_CPU_KV_CACHE_GB

GB = 10**9  # engine.kv_cache_memory_gb is in GB (1e9 bytes), as GPUs' memory sizes are quoted


@dataclass(frozen=True)
class CacheBudget:
    """A KV-cache budget in bytes, and the setting it comes from (for messages)."""

    bytes: int
    source: str  # e.g. "engine.kv_cache_memory_gb=2.0"
    device_total: int | None = None  # the GPU's total memory when the budget is a fraction of it


@dataclass(frozen=True)
class CachePlan:
    """How an engine's KV cache is sized: what `TorchEngine.cache_plan` reports."""

    slots: int  # sequences decoded at once: min(max_batch_size, budget // bytes_per_slot)
    max_seq_len: int  # positions per slot (the context)
    bytes_per_slot: int  # k and v of one full-context sequence, all layers
    cache_bytes: int  # slots * bytes_per_slot: what is allocated
    budget: CacheBudget
    max_batch_size: int  # the cap on slots that was asked for

    def __str__(self) -> str:
        capped = "max_batch_size" if self.slots == self.max_batch_size else "the budget"
        return (f"KV cache: {self.slots} slots (capped by {capped}; max_batch_size={self.max_batch_size}) x "
                f"{self.max_seq_len} tokens = {self.cache_bytes / GB:.2f} GB of a {self.budget.bytes / GB:.2f} GB "
                f"budget ({self.budget.source}); {self.bytes_per_slot / GB:.3f} GB per slot")


def cache_budget(device: torch.device | str, kv_cache_memory_gb: float | None, gpu_memory_fraction: float,
                 cpu_default_gb: float = DEFAULT_CPU_KV_CACHE_GB) -> CacheBudget:
    """The KV-cache budget of one engine on `device`, in bytes: kv_cache_memory_gb when set (on any device);
    else on CUDA gpu_memory_fraction of the device's *total* memory (not of what is free now, so the size
    does not depend on which pool started first on a shared GPU); elsewhere cpu_default_gb."""
    device = torch.device(device)
    if kv_cache_memory_gb is not None:
        return CacheBudget(int(kv_cache_memory_gb * GB), f"engine.kv_cache_memory_gb={kv_cache_memory_gb}")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return CacheBudget(int(gpu_memory_fraction * total),
                           f"engine.gpu_memory_fraction={gpu_memory_fraction} of the GPU's {total / GB:.1f} GB", total)
    return CacheBudget(int(cpu_default_gb * GB),
                       f"engine.kv_cache_memory_gb=null: the {device.type} default, {cpu_default_gb} GB")


def plan_cache(*, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, max_seq_len: int,
               max_batch_size: int, budget: CacheBudget) -> CachePlan:
    """Slots for a cache of full-context sequences within `budget`, at most max_batch_size. ValueError naming
    the keys to change, with the numbers, when not even one sequence fits."""
    element = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * num_layers * num_kv_heads * head_dim * element
    per_slot = per_token * max_seq_len
    slots = min(max_batch_size, budget.bytes // per_slot)
    if slots < 1:
        need_gb = -(-per_slot // 10**6) / 1000  # rounded up to a MB
        fix = f"set engine.kv_cache_memory_gb to at least {need_gb}"
        if budget.device_total:
            need_fraction = -(-per_slot * 1000 // budget.device_total) / 1000
            fix = f"raise engine.gpu_memory_fraction to at least {need_fraction} or {fix}"
        raise ValueError(
            f"the KV-cache budget of {budget.bytes / GB:.3f} GB ({budget.source}) holds no sequence of "
            f"model.max_seq_len={max_seq_len} tokens: one takes {per_slot / GB:.3f} GB (2 (k, v) x {num_layers} "
            f"layers x {num_kv_heads} KV heads x {head_dim} head dim x {element} bytes "
            f"({str(dtype).removeprefix('torch.')}) x {max_seq_len} positions). To fix: {fix}, or lower "
            f"model.max_seq_len to at most {budget.bytes // per_token}")
    return CachePlan(slots=int(slots), max_seq_len=max_seq_len, bytes_per_slot=per_slot,
                     cache_bytes=int(slots) * per_slot, budget=budget, max_batch_size=max_batch_size)


class KVCache:
    def __init__(
        self,
        num_layers: int,
        max_batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, max_batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len

    def write_prefill(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v of shape [B, H_kv, T, D] into positions [0, T) of `slots` ([B] int64)."""
        t = k.shape[2]
        self.k[layer, :, :, :t].index_copy_(0, slots, k)
        self.v[layer, :, :, :t].index_copy_(0, slots, v)

    def write_decode(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v of shape [B, H_kv, 1, D] for slots [0, B) at `positions` ([B] int64)."""
        b, h, _, d = k.shape
        index = positions.view(b, 1, 1, 1).expand(b, h, 1, d)
        self.k[layer, :b].scatter_(2, index, k)
        self.v[layer, :b].scatter_(2, index, v)

    def read(self, layer: int, batch: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of keys/values for slots [0, batch) and positions [0, kv_len): [batch, H_kv, kv_len, D]."""
        return self.k[layer, :batch, :, :kv_len], self.v[layer, :batch, :, :kv_len]


def decode_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Attention mask [B, 1, 1, kv_len] (True = attend): each slot sees keys at positions <= its own."""
    keys = torch.arange(kv_len, device=positions.device)
    return (keys[None, :] <= positions[:, None])[:, None, None, :]
