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
"""

from __future__ import annotations

import torch


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
