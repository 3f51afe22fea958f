"""The receiving side of a CUDA IPC refit (learner/ipc_source.py): an engine on the learner's GPU maps the
learner's flat weight buffer from its IPC handle (once per buffer) and copies each weight into place."""

from __future__ import annotations

import torch

from .engines.protocol import Engine


def _local_index(uuid: str) -> int | None:
    """This process's index of the GPU with `uuid`, or None when it cannot see it."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    return None


class IpcReceiver:
    def __init__(self) -> None:
        self.token = ""
        self.mapped: torch.Tensor | None = None
        self.index = 0

    def map(self, engine: Engine, device: torch.device, export: dict) -> None:
        """Check that this engine is on the learner's GPU and, for a new buffer, that the layout fits its model,
        and map the buffer. ValueError, with nothing changed, where either does not hold."""
        if device.type != "cuda":
            raise ValueError(f"the cuda_ipc refit transport needs engines on a GPU; this one is on {device}")
        index = _local_index(export["device"])
        here = device.index if device.index is not None else torch.cuda.current_device()
        if index != here:
            raise ValueError(f"the cuda_ipc refit transport needs the engine on the learner's GPU ({export['device']});"
                             f" this engine is on {torch.cuda.get_device_properties(here).uuid}: use "
                             "cluster.refit_transport=nccl for pools on GPUs of their own")
        if export["token"] != self.token:  # a new buffer: check the layout once, map it once
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            engine.check_layout(export["layout"])
            args = list(export["handle"])
            args[6] = index  # storage_device, as this process numbers the GPU (CUDA_VISIBLE_DEVICES may differ)
            self.mapped, self.token, self.index = rebuild_cuda_tensor(*args), export["token"], index

    def copy(self, engine: Engine, export: dict) -> None:
        """Copy the mapped weights into the engine's parameters (returns when they are in place)."""
        with torch.cuda.device(self.index):
            for entry in export["layout"]:
                engine.load_flat_bucket(entry, self.mapped[: entry["nbytes"]])
            torch.cuda.synchronize()  # the learner may overwrite the buffer at its next refit
