"""CUDA graphs for the torch engine's decode step (GPU only).

A decode step is ~15 small kernels per layer; at small per-step work the GPU waits on Python and kernel
launches. Capturing the step once per shape and replaying it removes both. A decode step's shapes depend on
(rows, window): rows are rounded up to a power of two (the extra rows are free slots, which sit at position
0 and are rewritten on their next prefill, so decoding them is harmless) and the attended cache window to
a power of two of at least 256 (`decode_window`; keys past a slot's length add nothing), keeping the number
of graphs small. Inputs are the engine's preallocated slot buffers and KV cache, so a replay reads their
current contents; the outputs (logits and their argmax) are the graph's own buffers, valid until that
graph's next replay.
"""

from __future__ import annotations

from typing import Callable

import torch

MIN_GRAPH_KV_LEN = 256
Outputs = tuple[torch.Tensor, torch.Tensor]  # logits [rows, V] in the model dtype, their argmax [rows]


def _pow2_at_least(n: int, floor: int = 1) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


def decode_window(kv_len: int, max_seq_len: int) -> int:
    """The cache window a decode step attends over: a power of two >= 256, at most max_seq_len."""
    return min(_pow2_at_least(kv_len, MIN_GRAPH_KV_LEN), max_seq_len)


class DecodeGraphs:
    def __init__(self, decode: Callable[[int, int], Outputs], max_rows: int, max_kv_len: int):
        """`decode(rows, kv_len)` runs the step eagerly over slots [0, rows) and returns (logits [rows, V],
        argmax [rows])."""
        self.decode = decode
        self.max_rows, self.max_kv_len = max_rows, max_kv_len
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Outputs]] = {}

    def shape(self, rows: int, kv_len: int) -> tuple[int, int]:
        return min(_pow2_at_least(rows), self.max_rows), decode_window(kv_len, self.max_kv_len)

    def run(self, rows: int, kv_len: int) -> Outputs:
        key = self.shape(rows, kv_len)
        if key not in self._graphs:
            self._graphs[key] = self._capture(*key)
        graph, (logits, argmax) = self._graphs[key]
        graph.replay()
        return logits[:rows], argmax[:rows]

    def _capture(self, rows: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, Outputs]:
        # Warm up on a side stream (lazy initialisations must not happen during capture). The warm-up
        # writes this step's keys/values for these slots: the same values the replay writes again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.decode(rows, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.decode(rows, kv_len)
        return graph, outputs
