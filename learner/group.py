"""The learner group: one Ray actor per rank, joined in a torch.distributed group.

The orchestrator talks to the group, never to single workers: a global batch is split into equal
contiguous shares, one per data-parallel rank (with the megatron backend the ranks of one tensor x pipeline
model-parallel group take the same share), every rank steps together, and rank 0 is the source of saves
and weight exports (the other ranks take part when the backend must gather weights).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

import ray
import torch
import torch.distributed as dist

from refit_wire import host_store, join_store

from .backends import LearnerBackend, make_backend
from .ipc_source import IpcSource
from .refit_source import RefitSource
from .types import LossConfig, OptimConfig, TrainSample

GROUP_TIMEOUT = timedelta(minutes=10)  # a rank that does not take part in a collective for this long fails it


@dataclass(frozen=True)
class LearnerSpec:
    model_dir: str
    optim: OptimConfig
    workers: int = 1
    num_cpus: float = 1
    num_gpus: float = 0
    dtype: str = "float32"
    seed: int = 0
    backend: str = "torch"  # a key of learner.backends.BACKENDS
    reference_dir: str | None = None  # resuming mid-iteration: the iteration-start weights (None = model_dir)
    resume_dir: str | None = None  # a checkpoint whose optimizer, schedule and RNG states to load
    torch_threads: int = 1  # CPU threads per worker; keeps several actors from oversubscribing the cores
    # The backend's own options (megatron: tensor_parallel, pipeline_parallel, with workers = tensor_parallel x
    # pipeline_parallel x data parallel); one the backend does not take is an error.
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RankLayout:
    """What a worker reports from setup."""

    data_rank: int  # which share of a global batch it takes
    data_size: int  # data-parallel size
    gathers_weights: bool  # the backend's capability: every rank takes part in exports and saves


class LearnerWorker:
    """One rank. Created through ray.remote by LearnerGroup."""

    def __init__(self, spec: LearnerSpec, rank: int):
        self.spec, self.rank = spec, rank
        self.backend: LearnerBackend | None = None  # built in setup
        self.store: dist.TCPStore | None = None  # the training group's rendezvous (rank 0 hosts it)
        self.refit = RefitSource(ray.util.get_node_ip_address()) if rank == 0 else None
        self.ipc = IpcSource() if rank == 0 else None  # cluster.refit_transport=cuda_ipc
        if spec.num_gpus == 0:
            torch.set_num_threads(spec.torch_threads)

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 hosts the store all ranks meet at; returns its address (this node's IP, the store's port)."""
        host = ray.util.get_node_ip_address()
        self.store = host_store(host, GROUP_TIMEOUT)
        return host, self.store.port

    def setup(self, address: tuple[str, int] | None) -> RankLayout:
        """Join the group at `address` (rank 0's store; None for one worker) and load the model."""
        world = self.spec.workers
        if world > 1:
            if self.rank != 0:
                self.store = join_store(*address, GROUP_TIMEOUT)
            dist.init_process_group("nccl" if self.spec.num_gpus > 0 else "gloo", store=self.store, rank=self.rank,
                                    world_size=world, timeout=GROUP_TIMEOUT)
        self.backend = make_backend(self.spec.backend, self.spec.model_dir, self.spec.optim, self.spec.options,
                                    device="cuda" if self.spec.num_gpus > 0 else "cpu", dtype=self.spec.dtype,
                                    rank=self.rank, world_size=world, seed=self.spec.seed,
                                    reference_dir=self.spec.reference_dir)
        if self.spec.resume_dir:
            self.backend.load_training_state(self.spec.resume_dir)
        return RankLayout(*self.backend.data_parallel, gathers_weights=self.backend.gathers_weights)

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        """Answers while a step runs (its own thread): a health check that tells a busy worker from a hung one."""
        return True

    def train_step(self, samples: Sequence[TrainSample], loss_cfg: LossConfig) -> dict[str, float]:
        metrics = self.backend.train_step(samples, loss_cfg)
        if self.ipc is not None and self.ipc.live:  # engines copying the live weights wait for this step
            self.ipc.fence(self.backend.named_weights())
        return metrics

    def sft_nll(self, samples: Sequence[TrainSample]) -> tuple[float, float]:
        return self.backend.sft_nll(samples)

    def update_reference(self) -> None:
        self.backend.update_reference()

    def reset_optimizer(self) -> None:
        self.backend.reset_optimizer()

    def rng_state(self) -> dict:
        return self.backend.rng_state()

    def save(self, path: str, rng_states: list[dict]) -> None:
        self.backend.save(path, rng_states)

    def export_bucket_refs(self, bucket_bytes: int) -> list:
        """Put each weight bucket in the object store once; replicas read it zero-copy."""
        return [ray.put(b) for b in self.backend.export_buckets(bucket_bytes)]

    def weight_digest(self) -> dict[str, str]:
        """SHA-1 of every exported parameter's bytes (the same digest engines report after a refit)."""
        import hashlib

        return {name: hashlib.sha1(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
                for name, t in self.backend.named_weights()}

    # Collective refit: rank 0 is the source (learner/refit_source.py, orchestration/refit.py). Where the
    # backend gathers weights collectively (megatron), the other ranks take part in layout and send.

    def refit_address(self) -> tuple[str, int]:
        return self.refit.address()

    def join_refit_group(self, generation: int, size: int, backend: str) -> None:
        self.refit.join(generation, size, backend)

    def leave_refit_group(self) -> None:
        self.refit.leave()

    def refit_layout(self, bucket_bytes: int, dtype: str | None) -> list[dict] | None:
        if self.refit is None:
            return self._take_part_in_gather()
        return self.refit.set_layout(self.backend.named_weights(), bucket_bytes, dtype, self.backend.device)

    def send_weights(self) -> None:
        if self.refit is None:
            return self._take_part_in_gather()
        self.refit.send(self.backend.named_weights())

    def ipc_export(self, dtype: str | None) -> dict | None:
        """CUDA IPC refit (learner/ipc_source.py): what engines need to copy the weights, live where the backend's
        weights are its model's own tensors, else packed into the shared buffer (rank 0; the other exporters
        take part in the gather and return None)."""
        if self.ipc is None:
            return self._take_part_in_gather()
        return self.ipc.export(self.backend.named_weights(), dtype, self.backend.device,
                               live=self.backend.live_weights)

    def _take_part_in_gather(self) -> None:
        for _ in self.backend.named_weights():  # yields nothing off rank 0; its collectives are the point
            pass


class LearnerGroup:
    def __init__(self, spec: LearnerSpec, scheduling: Sequence | None = None, *,
                 wait: Callable[[Any], Any] = ray.get, setup_timeout_s: float = 600.0):
        """`scheduling`: one Ray scheduling strategy per rank (the caller's placement), or None: Ray places them.
        `wait`: how the results of the group's calls are awaited, like ray.get (the orchestrator passes one with
        health checks); called only after construction. `setup_timeout_s`: how long the rendezvous and then the
        setup (joining the group, loading the model) may each take: SetupTimeout naming the late workers."""
        self.spec = spec
        self.wait = wait
        actor_cls = ray.remote(concurrency_groups={"health": 1})(LearnerWorker)
        self.workers = [actor_cls.options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                                          scheduling_strategy=scheduling[rank] if scheduling else None
                                          ).remote(spec, rank)
                        for rank in range(spec.workers)]
        try:
            address = None
            if spec.workers > 1:
                [address] = _bounded_get([self.workers[0].rendezvous_address.remote()], "the rendezvous",
                                         setup_timeout_s)
            layout = _bounded_get([w.setup.remote(address) for w in self.workers], "setup", setup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.data_ranks = [r.data_rank for r in layout]  # each worker's share of a batch
        self.data_parallel = layout[0].data_size
        # A backend that gathers weights over ranks needs every worker in an export; otherwise rank 0 has them.
        self._exporters = self.workers if layout[0].gathers_weights else self.workers[:1]

    def shards(self, samples: Sequence[TrainSample]) -> list[list[TrainSample]]:
        """Each worker's share: equal contiguous slices, one per data-parallel rank."""
        if len(samples) % self.data_parallel:
            raise ValueError(f"{len(samples)} samples do not split evenly over {self.data_parallel} data-parallel "
                             "learner ranks")
        k = len(samples) // self.data_parallel
        return [list(samples[r * k : (r + 1) * k]) for r in self.data_ranks]

    def train_step_async(self, samples: Sequence[TrainSample], loss_cfg: LossConfig) -> list:
        """Start one optimizer step; returns every rank's future (rank 0's first)."""
        return [w.train_step.remote(s, loss_cfg) for w, s in zip(self.workers, self.shards(samples))]

    def sft_nll(self, samples: Sequence[TrainSample]) -> float:
        """Mean token NLL of the chosen responses; pads the last share by splitting unevenly."""
        k = -(-len(samples) // self.data_parallel)
        shares = [list(samples[r * k : (r + 1) * k]) for r in self.data_ranks]
        total, count = self.wait([w.sft_nll.remote(s) for w, s in zip(self.workers, shares)])[0]
        return total / max(count, 1.0)

    def update_reference(self) -> None:
        self.wait([w.update_reference.remote() for w in self.workers])

    def reset_optimizer(self) -> None:
        self.wait([w.reset_optimizer.remote() for w in self.workers])

    def save(self, path: str) -> None:
        """Rank 0 writes the checkpoint, with every rank's RNG state."""
        rngs = self.wait([w.rng_state.remote() for w in self.workers])
        self.wait([w.save.remote(path, rngs) for w in self.workers])

    def ping_refs(self) -> list:
        return [w.ping.remote() for w in self.workers]

    def export_bucket_refs(self, bucket_bytes: int) -> list:
        return self.wait([w.export_bucket_refs.remote(bucket_bytes) for w in self._exporters])[0]

    def weight_digest(self) -> dict[str, str]:
        return self.wait([w.weight_digest.remote() for w in self._exporters])[0]

    # Collective refit: rank 0 is the source (with DDP it holds the full weights; megatron gathers them over
    # every rank in named_weights(), so all exporters take part in layout and send). The join, leave and send
    # calls return refs: every member of the refit group must be in them at once.

    def refit_address(self) -> tuple[str, int]:
        return self.wait(self.workers[0].refit_address.remote())

    def join_refit_group(self, generation: int, size: int, backend: str):
        return self.workers[0].join_refit_group.remote(generation, size, backend)

    def leave_refit_group(self):
        return self.workers[0].leave_refit_group.remote()

    def refit_layout(self, bucket_bytes: int, dtype: str | None) -> list[dict]:
        return self.wait([w.refit_layout.remote(bucket_bytes, dtype) for w in self._exporters])[0]

    def send_weights(self) -> list:
        """Refs of the send: rank 0's first, then the other exporters' part in the gather."""
        return [w.send_weights.remote() for w in self._exporters]

    def ipc_export(self, dtype: str | None) -> list:
        """Refs of the CUDA IPC export: rank 0's (the export) first, then the other exporters' part in the gather."""
        return [w.ipc_export.remote(dtype) for w in self._exporters]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)


class SetupTimeout(RuntimeError):
    """A learner worker did not finish its rendezvous or setup within the group's setup_timeout_s."""


def _bounded_get(refs: list, stage: str, timeout_s: float) -> list:
    """ray.get of one call per worker (refs[r] on rank r) within `timeout_s`: SetupTimeout naming the ranks still
    busy then. A worker's error is raised as soon as it arrives (the other ranks may wait for it forever)."""
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            late = ", ".join(str(rank) for rank, ref in enumerate(refs) if ref in pending)
            raise SetupTimeout(f"learner worker(s) {late} did not finish {stage} within {timeout_s:g}s "
                               "(setup_timeout_s): a worker that cannot be placed, or cannot reach rank 0, waits here")
        ray.get(done)
    return ray.get(refs)
