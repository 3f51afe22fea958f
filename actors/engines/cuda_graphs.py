"""CUDA graphs for the torch engine's decode step (GPU only).

A decode step is ~15 small kernels per layer; at small per-step work the GPU waits on Python and kernel
launches. Capturing the step once per shape and replaying it removes both. A decode step's shapes depend on
(rows, kv_len): rows are rounded up to a power of two (the extra rows are free slots, which sit at position
0 and are rewritten on their next prefill, so decoding them is harmless) and kv_len to a power of two of at
least 256 (masked keys add nothing), keeping the number of graphs small. Inputs are the engine's
preallocated slot buffers and KV cache, so a replay reads their current contents; the output is the
graph's own logits buffer, valid until that graph's next replay.
"""

from __future__ import annotations

from typing import Callable

import torch

MIN_GRAPH_KV_LEN = 256


def _pow2_at_least(n: int, floor: int = 1) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


class DecodeGraphs:
    def __init__(self, decode: Callable[[int, int], torch.Tensor], max_rows: int, max_kv_len: int):
        """`decode(rows, kv_len)` runs the step eagerly over slots [0, rows) and returns logits [rows, V]."""
        self.decode = decode
        self.max_rows, self.max_kv_len = max_rows, max_kv_len
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def shape(self, rows: int, kv_len: int) -> tuple[int, int]:
        return (min(_pow2_at_least(rows), self.max_rows),
                min(_pow2_at_least(kv_len, MIN_GRAPH_KV_LEN), self.max_kv_len))

    def run(self, rows: int, kv_len: int) -> torch.Tensor:
        key = self.shape(rows, kv_len)
        if key not in self._graphs:
            self._graphs[key] = self._capture(*key)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[:rows]

    def _capture(self, rows: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream (lazy initialisations must not happen during capture). The warm-up
        # writes this step's keys/values for these slots: the same values the replay writes again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.decode(rows, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.decode(rows, kv_len)
        return graph, logits

    def clear(self) -> None:
        self._graphs.clear()

    def __len__(self) -> int:
        return len(self._graphs)
