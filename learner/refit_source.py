"""The source side of a collective weight refit (rank 0 of the refit group, in learner rank 0).

The orchestrator (orchestration/refit.py) builds a group over this rank and every engine replica. This
side hosts the group's rendezvous store, computes the bucket layout once, and on each refit packs its
weights into two preallocated flat buffers in turn and broadcasts them: packing bucket i+1 overlaps the
broadcast of bucket i (on GPUs NCCL runs on its own stream; `Work.wait` only orders streams, so the host
never waits per bucket). The group is a standalone process group object, not torch.distributed's default
group, which data-parallel training already uses.

The group's store, set-up and bucket layout are the refit wire format's (refit_wire), as on the receiving side.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from refit_wire import bucket_layout, host_store, open_group, pack_entries


class RefitSource:
    def __init__(self, host: str):
        self.host = host
        self.store: dist.TCPStore | None = None  # the group's rendezvous; lives as long as this worker
        self.group = None
        self.backend = ""
        self.generation = 0
        self.layout: list[dict] = []
        self.buffers: list[torch.Tensor] = []

    def address(self) -> tuple[str, int]:
        """Where the members meet: this node's IP and the port of the store, hosted once."""
        if self.store is None:
            self.store = host_store(self.host)
        return self.host, self.store.port

    def join(self, generation: int, size: int, backend: str) -> None:
        self.leave()
        self.address()
        self.group = open_group(self.store, generation, 0, size, backend)
        self.generation = generation
        self.backend = backend

    def leave(self) -> None:
        if self.group is not None:
            self.group.abort()  # local only: peers may be gone (a restarted engine never joined this group)
        self.group, self.generation, self.layout, self.buffers = None, 0, [], []

    def set_layout(self, named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, dtype: str | None,
                   device: torch.device) -> list[dict]:
        """Compute the layout (sent to every engine) and allocate the two send buffers."""
        if self.group is None:
            raise RuntimeError("set_layout before joining a refit group")
        self.layout, self.buffers = bucket_layout(named, bucket_bytes, dtype), []
        where = device if self.backend == "nccl" else torch.device("cpu")
        largest = max(entry["nbytes"] for entry in self.layout)
        self.buffers = [torch.zeros(largest, dtype=torch.uint8, device=where)
                        for _ in range(min(2, len(self.layout)))]
        return self.layout

    @torch.no_grad()
    def send(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Broadcast every bucket of the layout, packed from `named` (cast to the layout's dtypes)."""
        if not self.layout:
            raise RuntimeError("send before the layout was set (the orchestrator builds the group first)")
        tensors = dict(named)
        for entry in self.layout:  # all checked before the first broadcast: the receivers would wait forever
            for name, shape in zip(entry["names"], entry["shapes"]):
                if name not in tensors or tuple(tensors[name].shape) != tuple(shape):
                    raise RuntimeError(f"weight {name!r} no longer matches the refit layout")
        works = [None] * len(self.buffers)
        for i, entry in enumerate(self.layout):
            slot = i % len(self.buffers)
            if works[slot] is not None:
                works[slot].wait()  # the broadcast that last read this buffer is done (GPU: the stream waits)
            buffer = self.buffers[slot][: entry["nbytes"]]
            pack_entries(entry, tensors, buffer)
            works[slot] = self.group.broadcast(buffer, root=0)
        for work in works:
            if work is not None:
                work.wait()
        if self.buffers[0].is_cuda:
            torch.cuda.current_stream().synchronize()
