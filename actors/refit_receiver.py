"""The receiving side of a collective weight refit (one rank of the refit group per engine replica).

The orchestrator (orchestration/refit.py) builds a group over learner rank 0 (the source, rank 0) and every
engine replica, hands each replica the bucket layout once (validated against the engine and answered with
preallocated receive buffers), and then each refit is one broadcast per bucket. Two buffers alternate:
bucket i+1 is received while bucket i is unpacked into the engine's parameters (on GPUs on a side stream;
`Work.wait` only orders streams, so the host never waits per bucket). The version changes only when every
bucket is in.

The group's store, set-up and bucket layout are the refit wire format's (refit_wire), as on the source side.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from refit_wire import BucketLayout, join_store, open_group

from .engines.protocol import Engine


class RefitReceiver:
    def __init__(self) -> None:
        self.group = None
        self.store: dist.TCPStore | None = None
        self.backend = ""
        self.generation = 0  # 0: in no group (a restarted replica starts here)
        self.layout: list[BucketLayout] = []
        self.buffers: list[torch.Tensor] = []
        self.stream = None  # GPU: where buckets are unpacked, beside the stream that receives

    def join(self, host: str, port: int, generation: int, rank: int, size: int, backend: str) -> None:
        self.leave()
        self.store = join_store(host, port)
        self.group = open_group(self.store, generation, rank, size, backend)
        self.generation, self.backend = generation, backend

    def leave(self) -> None:
        if self.group is not None:
            self.group.abort()  # local only: peers may be gone
        self.group, self.store, self.generation, self.layout, self.buffers = None, None, 0, [], []

    def prepare(self, layout: Sequence[BucketLayout], engine: Engine, device: torch.device) -> None:
        """Validate `layout` against the engine (ValueError, nothing changed) and allocate the buffers."""
        if self.group is None:
            raise RuntimeError("prepare_refit before joining a refit group")
        if not layout:
            raise ValueError("empty refit layout")
        engine.check_layout(layout)
        if self.backend == "nccl" and device.type != "cuda":
            raise ValueError(f"the nccl refit transport needs engines on GPUs; this one is on {device}")
        where = device if self.backend == "nccl" else torch.device("cpu")
        largest = max(int(entry["nbytes"]) for entry in layout)
        self.layout, self.buffers = list(layout), []
        self.buffers = [torch.empty(largest, dtype=torch.uint8, device=where) for _ in range(min(2, len(layout)))]
        self.stream = torch.cuda.Stream(device=where) if where.type == "cuda" else None

    def receive(self, engine: Engine) -> None:
        """Receive every bucket of the layout into the engine's parameters (returns when they are in place)."""
        if not self.layout:
            raise RuntimeError("receive before a layout was prepared (the orchestrator builds the group first)")
        n, slots = len(self.layout), len(self.buffers)
        unpacked: list = [None] * slots  # GPU: per buffer, the event after the last unpack that read it

        def post(i: int):
            if unpacked[i % slots] is not None:  # receiving into a buffer waits for its previous unpack
                torch.cuda.current_stream().wait_event(unpacked[i % slots])
            return self.group.broadcast(self.buffers[i % slots][: self.layout[i]["nbytes"]], root=0)

        work = post(0)
        for i, entry in enumerate(self.layout):
            work.wait()  # CPU: until bucket i is here; GPU: the current stream waits, the host goes on
            work = post(i + 1) if i + 1 < n else None
            data = self.buffers[i % slots][: entry["nbytes"]]
            if self.stream is None:
                engine.load_flat_bucket(entry, data)
                continue
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                engine.load_flat_bucket(entry, data)
                unpacked[i % slots] = self.stream.record_event()
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
            torch.cuda.current_stream().synchronize()
