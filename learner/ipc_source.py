"""The source side of a CUDA IPC refit (`cluster.refit_transport=cuda_ipc`, orchestration/ipc_refit.py): learner
rank 0 and the engines share one GPU (the one-GPU layout, pools on fractions of it).

Two ways to hand the weights over, both as refit-bucket layouts (refit_wire) over memory the engines map
through CUDA IPC handles (actors/ipc_receiver.py):

- live (backends whose `named_weights` are the model's own tensors, updated in place: the torch backend
  unsharded): the layout describes the storages the weights already live in (the mixed-precision model's one
  flat bf16 buffer, or each parameter's storage) and is exported once. A refit copies nothing on this side:
  every engine copies straight from the learner's weights, after waiting (on the GPU) for an interprocess
  event this side records after every step. One copy, one Ray call per engine, no extra memory.
- staged (weights gathered or converted on export: megatron, fsdp2): one flat buffer in the engines' dtype,
  allocated and exported once; each refit packs the weights into it (one multi-tensor copy) and records the
  event. The buffer costs one copy of the weights on the learner's GPU, for as long as the learner lives.

The caller guarantees that the learner does not step while engines copy (refits happen between steps).
"""

from __future__ import annotations

import uuid
from typing import Iterable

import torch

from refit_wire import bucket_layout, dtype_name, entry_views

ONE_BUCKET = 1 << 62  # every staged weight in one bucket: the engines copy from one mapped buffer


def device_uuid(device: torch.device) -> str:
    """The GPU's UUID: the same physical device whatever CUDA_VISIBLE_DEVICES calls it in each process."""
    return str(torch.cuda.get_device_properties(device).uuid)


def storage_layout(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[dict], list[torch.Tensor]]:
    """(one refit-bucket layout entry per storage the tensors live in, a uint8 tensor over each whole storage):
    each entry's offsets are the tensors' byte offsets in their storage, so `entry_views(entry, raw)` gives
    back views of the very tensors. ValueError for a tensor that is not contiguous (no flat view of it)."""
    entries: dict[int, dict] = {}
    raws: dict[int, torch.Tensor] = {}
    for name, tensor in named:
        if not tensor.is_contiguous():
            raise ValueError(f"weight {name!r} is not contiguous: it cannot be mapped as a flat view")
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in entries:
            entries[key] = {"names": [], "dtypes": [], "shapes": [], "offsets": [], "nbytes": storage.nbytes()}
            raws[key] = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
        entry = entries[key]
        entry["names"].append(name)
        entry["dtypes"].append(dtype_name(tensor.dtype))
        entry["shapes"].append(tuple(tensor.shape))
        entry["offsets"].append(tensor.data_ptr() - key)
    return list(entries.values()), list(raws.values())


class IpcSource:
    def __init__(self) -> None:
        self.export_: dict | None = None  # what the engines need, sent again unchanged while `token` holds
        self.live = False
        self.raws: list[torch.Tensor] = []  # the exported memory (kept referenced: the engines map it)
        self.pointers: list[int] = []  # live: each weight's address when exported; staged: unused
        self.names: list[str] = []
        self.views: list[torch.Tensor] = []  # staged: each weight's place in the buffer, in the layout's order
        self.event: torch.cuda.Event | None = None  # recorded after every change of what the engines read

    @torch.no_grad()
    def export(self, named: Iterable[tuple[str, torch.Tensor]], dtype: str | None, device: torch.device,
               live: bool) -> dict:
        """What an engine needs to copy the weights: the layout, a handle per layout entry, the event, a token
        naming this memory and the GPU's UUID. Live: exported at the first call and again only if the weights
        moved; staged: the weights are packed into the buffer first."""
        if device.type != "cuda":
            raise ValueError(f"the cuda_ipc refit transport needs the learner on a GPU; it is on {device}")
        tensors = {name: t.detach() for name, t in named}
        if self.export_ is None or live != self.live or (live and self._moved(tensors)):
            self._lay_out(tensors, dtype, device, live)
        elif not live:
            missing = [name for name in self.names if name not in tensors]
            if missing or len(tensors) != len(self.names):
                raise ValueError(f"the learner's weights changed names since its CUDA IPC buffer was laid out "
                                 f"(missing: {missing[:3]}); the buffer cannot be reused")
        if not live:  # one multi-tensor launch instead of a copy kernel per weight (~150 for a 1B model)
            torch._foreach_copy_(self.views, [tensors[name] for name in self.names])
        self.event.record()
        return self.export_

    def fence(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """After a step (`named`: the weights now): let the engines' next copy wait, on the GPU, for the step.
        A live export whose weights were re-allocated would leave engines copying the old ones, so that stops
        the run instead."""
        if self.export_ is None:
            return
        if self.live and self._moved({name: t.detach() for name, t in named}):
            raise RuntimeError("the learner's weights moved in GPU memory after they were exported for cuda_ipc "
                               "refits (a backend that re-allocates them must not export them live)")
        self.event.record()

    def _moved(self, tensors: dict[str, torch.Tensor]) -> bool:
        return list(tensors) != self.names or [t.data_ptr() for t in tensors.values()] != self.pointers

    def _lay_out(self, tensors: dict[str, torch.Tensor], dtype: str | None, device: torch.device,
                 live: bool) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        if live:
            layout, self.raws = storage_layout(tensors.items())
            self.names, self.views = list(tensors), list(tensors.values())
            self.pointers = [t.data_ptr() for t in self.views]
        else:
            layout = bucket_layout(tensors.items(), ONE_BUCKET, dtype)
            self.raws = [torch.empty(layout[0]["nbytes"], dtype=torch.uint8, device=device)]
            views = entry_views(layout[0], self.raws[0])
            self.names, self.views, self.pointers = list(views), list(views.values()), []
        self.live = live
        if self.event is None:
            self.event = torch.cuda.Event(interprocess=True)
        self.export_ = {"layout": layout, "handles": [reduce_tensor(raw)[1] for raw in self.raws],
                        "event": self.event.ipc_handle(), "token": uuid.uuid4().hex, "device": device_uuid(device),
                        "live": live}
