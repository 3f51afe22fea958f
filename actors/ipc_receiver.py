"""The receiving side of a CUDA IPC refit (learner/ipc_source.py): an engine on the learner's GPU maps the
memory the learner exported (its live weights, or its staging buffer) from the IPC handles, once per export,
and copies every weight into place after waiting, on the GPU, for the learner's last step."""

from __future__ import annotations

import torch

from refit_wire import entry_views

from .engines.protocol import Engine


def _local_index(uuid: str) -> int | None:
    """This process's index of the GPU with `uuid`, or None when it cannot see it."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    return None


class NotOnLearnersGpu(ValueError):
    """This engine is on another GPU than learner rank 0 (cluster.refit_transport=auto then uses the object store)."""


class IpcReceiver:
    def __init__(self) -> None:
        self.token = ""
        self.mapped: list[torch.Tensor] = []  # the learner's memory, one flat uint8 tensor per layout entry
        self.event: torch.cuda.Event | None = None  # recorded by the learner after each step (or pack)
        self.index = 0
        self.pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # (engine parameters, mapped views)

    def map(self, engine: Engine, device: torch.device, export: dict) -> None:
        """Check that this engine is on the learner's GPU and, for a new export, that the layout fits its model,
        and map the memory. ValueError, with nothing changed, where either does not hold."""
        if device.type != "cuda":
            raise ValueError(f"the cuda_ipc refit transport needs engines on a GPU; this one is on {device}")
        index = _local_index(export["device"])
        here = device.index if device.index is not None else torch.cuda.current_device()
        if index != here:
            raise NotOnLearnersGpu(f"the cuda_ipc refit transport needs the engine on the learner's GPU ({export['device']});"
                             f" this engine is on {torch.cuda.get_device_properties(here).uuid}: use "
                             "cluster.refit_transport=nccl for pools on GPUs of their own")
        if export["token"] == self.token:
            return
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        engine.check_layout(export["layout"])
        mapped = []
        for handle in export["handles"]:
            args = list(handle)
            args[6] = index  # storage_device, as this process numbers the GPU (CUDA_VISIBLE_DEVICES may differ)
            mapped.append(rebuild_cuda_tensor(*args))
        params = engine.named_parameters_hf()  # views of the parameters served (fused QKV, gate/up included)
        pairs = [(params[name], view) for entry, raw in zip(export["layout"], mapped)
                 for name, view in entry_views(entry, raw).items()]
        self.event = torch.cuda.Event.from_ipc_handle(index, export["event"])
        self.mapped, self.token, self.index = mapped, export["token"], index
        self.pairs = ([p for p, _ in pairs], [v for _, v in pairs])

    def copy(self) -> None:
        """Copy the mapped weights into the engine's parameters (returns when they are in place): one
        multi-tensor copy (casting where the dtypes differ), queued behind the learner's last recorded step."""
        with torch.cuda.device(self.index), torch.no_grad():
            torch.cuda.current_stream().wait_event(self.event)
            torch._foreach_copy_(*self.pairs)
            torch.cuda.synchronize()  # the learner may step (or pack) again as soon as the refit returns
