"""The receiving side of a CUDA IPC refit (learner/ipc_source.py): an engine on the learner's GPU maps the
memory the learner exported (its live weights, or its staging buffer) from the IPC handles, once per export,
and copies every weight into place after waiting, on the GPU, for the learner's last step. Where the
learner's weights are one flat buffer and the engine can lay its parameters out the same way
(`TorchEngine.adopt_layout`), the copy is a single one of the whole buffer."""

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


class NotMapped(ValueError):
    """A refit named an export this process has not mapped (a replica Ray restarted): send the export itself."""


class IpcReceiver:
    def __init__(self) -> None:
        self.token = ""
        self.mapped: list[torch.Tensor] = []  # the learner's memory, one flat uint8 tensor per layout entry
        self.event: torch.cuda.Event | None = None  # recorded by the learner after each step (or pack)
        self.index = 0
        self.pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # (engine parameters, mapped views)

    def map(self, engine: Engine, device: torch.device, export: dict | str) -> None:
        """Check that this engine is on the learner's GPU and, for a new export, that the layout fits its model,
        and map the memory. ValueError, with nothing changed, where either does not hold. `export` may be just
        the token of the export mapped before (what a refit sends: the layout's ~150 entries cost ~1 ms per Ray
        call to serialise); NotMapped if this process has not mapped it."""
        if isinstance(export, str):
            if export != self.token:
                raise NotMapped(f"CUDA IPC export {export} is not mapped in this process (mapped: "
                                f"{self.token or 'none'})")
            return
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
        # One flat memory on the learner's side: the engine's parameters move into a buffer laid out the same
        # way where its model allows, and a refit is one copy of it (else one multi-tensor copy of ~150 weights).
        adopt = getattr(engine, "adopt_layout", None)
        flat = adopt(export["layout"][0]) if adopt is not None and len(mapped) == 1 else None
        if flat is not None:
            pairs = [(flat, mapped[0])]
        else:
            params = engine.named_parameters_hf()  # views of the parameters served (fused QKV, gate/up included)
            pairs = [(params[name], view) for entry, raw in zip(export["layout"], mapped)
                     for name, view in entry_views(entry, raw).items()]
        self.event = torch.cuda.Event.from_ipc_handle(index, export["event"])
        self.mapped, self.token, self.index = mapped, export["token"], index
        self.pairs = ([p for p, _ in pairs], [v for _, v in pairs])

    def copy(self) -> None:
        """Copy the mapped weights into the engine's parameters (returns when they are in place): one copy of the
        flat buffer, or one multi-tensor copy (casting where the dtypes differ), queued behind the learner's last
        recorded step."""
        with torch.cuda.device(self.index), torch.no_grad():
            torch.cuda.current_stream().wait_event(self.event)
            if len(self.pairs[0]) == 1:
                self.pairs[0][0].copy_(self.pairs[1][0])
            else:
                torch._foreach_copy_(*self.pairs)
            torch.cuda.synchronize()  # the learner may step (or pack) again as soon as the refit returns
