"""The source side of a CUDA IPC refit (`cluster.refit_transport=cuda_ipc`, orchestration/refit.py): learner
rank 0 and the engines share one GPU (the one-GPU layout, pools on fractions of it).

Rank 0 keeps one flat buffer on its GPU holding every weight in the engines' dtype, laid out as one refit
bucket (refit_wire.bucket_layout), and exports a CUDA IPC handle to it once. Each refit packs the weights
into the buffer (a device-to-device copy, cast on the way) and waits for the copy; the engines map the
buffer from the handle (once per buffer, actors/ipc_receiver.py) and copy from it into their parameters.
No byte goes through the host. The buffer costs one copy of the weights in the engines' dtype on the
learner's GPU, for as long as the learner lives.
"""

from __future__ import annotations

import uuid
from typing import Iterable

import torch

from refit_wire import bucket_layout, entry_views

ONE_BUCKET = 1 << 62  # every weight in one bucket: the engines copy from one mapped buffer


def device_uuid(device: torch.device) -> str:
    """The GPU's UUID: the same physical device whatever CUDA_VISIBLE_DEVICES calls it in each process."""
    return str(torch.cuda.get_device_properties(device).uuid)


class IpcSource:
    def __init__(self) -> None:
        self.layout: list[dict] = []
        self.buffer: torch.Tensor | None = None
        self.handle: tuple | None = None  # the rebuild arguments of torch.multiprocessing's CUDA reduction
        self.token = ""  # names this buffer: a receiver maps it again only when the token changes
        self.names: list[str] = []
        self.views: list[torch.Tensor] = []  # each weight's place in the buffer, in the layout's order

    @torch.no_grad()
    def export(self, named: Iterable[tuple[str, torch.Tensor]], dtype: str | None, device: torch.device) -> dict:
        """Pack the weights into the shared buffer (allocated and exported at the first call) and return what
        an engine needs to copy them: the layout, the handle, the token and the GPU's UUID."""
        if device.type != "cuda":
            raise ValueError(f"the cuda_ipc refit transport needs the learner on a GPU; it is on {device}")
        tensors = {name: t.detach() for name, t in named}
        if self.buffer is None:
            from torch.multiprocessing.reductions import reduce_tensor

            self.layout = bucket_layout(tensors.items(), ONE_BUCKET, dtype)
            self.buffer = torch.empty(self.layout[0]["nbytes"], dtype=torch.uint8, device=device)
            self.handle = reduce_tensor(self.buffer)[1]
            self.token = uuid.uuid4().hex
            views = entry_views(self.layout[0], self.buffer)
            self.names, self.views = list(views), list(views.values())
        missing = [name for name in self.names if name not in tensors]
        if missing or len(tensors) != len(self.names):
            raise ValueError(f"the learner's weights changed names since its CUDA IPC buffer was laid out "
                             f"(missing: {missing[:3]}); the buffer cannot be reused")
        # one multi-tensor launch per dtype group instead of a copy kernel per weight (~150 for a 1B model)
        torch._foreach_copy_(self.views, [tensors[name] for name in self.names])
        torch.cuda.synchronize(device)  # the engines read it from their own streams
        return {"layout": self.layout, "handle": self.handle, "token": self.token, "device": device_uuid(device)}
