"""The learner group: one Ray actor per rank, joined in a torch.distributed group.

The orchestrator talks to the group, never to single workers: a global batch is split into equal
contiguous shares, one per data-parallel rank (with the megatron backend the ranks of one tensor x pipeline
model-parallel group take the same share), every rank steps together, and rank 0 is the source of saves
and weight exports (the other ranks take part when the backend must gather weights).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import ray
import torch
import torch.distributed as dist

from .backends.torch_backend import TorchBackend
from .refit_source import RefitSource
from .types import LossConfig, OptimConfig, TrainSample


@dataclass(frozen=True)
class LearnerSpec:
    model_dir: str
    optim: OptimConfig
    workers: int = 1
    num_cpus: float = 1
    num_gpus: float = 0
    dtype: str = "float32"
    seed: int = 0
    backend: str = "torch"
    reference_dir: str | None = None  # resuming mid-iteration: the iteration-start weights (None = model_dir)
    resume_dir: str | None = None  # a checkpoint whose optimizer, schedule and RNG states to load
    torch_threads: int = 1  # CPU threads per worker; keeps several actors from oversubscribing the cores
    tensor_parallel: int = 1  # megatron backend: workers = tensor_parallel x pipeline_parallel x data parallel
    pipeline_parallel: int = 1


class LearnerWorker:
    """One rank. Created through ray.remote by LearnerGroup."""

    def __init__(self, spec: LearnerSpec, rank: int):
        self.spec, self.rank = spec, rank
        self.backend = None  # TorchBackend or MegatronBackend, built in setup
        self.refit = RefitSource(ray.util.get_node_ip_address()) if rank == 0 else None
        if spec.num_gpus == 0:
            torch.set_num_threads(spec.torch_threads)

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 picks the address all ranks meet at: this node's IP and a free port."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def setup(self, host: str, port: int) -> tuple[int, int]:
        """Join the group and load the model; returns (data-parallel rank, data-parallel size)."""
        world = self.spec.workers
        if world > 1:
            backend = "nccl" if self.spec.num_gpus > 0 else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                    world_size=world, timeout=timedelta(minutes=10))
        common = dict(device="cuda" if self.spec.num_gpus > 0 else "cpu", dtype=self.spec.dtype, rank=self.rank,
                      world_size=world, seed=self.spec.seed, reference_dir=self.spec.reference_dir)
        if self.spec.backend == "torch":
            self.backend = TorchBackend(self.spec.model_dir, self.spec.optim, **common)
        elif self.spec.backend == "megatron":
            from .backends.megatron.backend import MegatronBackend  # optional dependency

            self.backend = MegatronBackend(self.spec.model_dir, self.spec.optim, **common,
                                           tensor_parallel=self.spec.tensor_parallel,
                                           pipeline_parallel=self.spec.pipeline_parallel)
        else:
            raise ValueError(f"learner.backend={self.spec.backend!r} is not one of: torch, megatron")
        if self.spec.resume_dir:
            self.backend.load_training_state(self.spec.resume_dir)
        return self.backend.data_parallel

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        """Answers while a step runs (its own thread): a health check that tells a busy worker from a hung one."""
        return True

    def train_step(self, samples: Sequence[TrainSample], loss_cfg: LossConfig) -> dict[str, float]:
        return self.backend.train_step(samples, loss_cfg)

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

    def _take_part_in_gather(self) -> None:
        for _ in self.backend.named_weights():  # yields nothing off rank 0; its collectives are the point
            pass


class LearnerGroup:
    def __init__(self, spec: LearnerSpec, scheduling: Sequence | None = None):
        """`scheduling`: one Ray scheduling strategy per rank (the caller's placement), or None: Ray places them."""
        self.spec = spec
        # How results are awaited; the orchestrator swaps in a wait with timeouts and health checks.
        self.get = ray.get
        actor_cls = ray.remote(concurrency_groups={"health": 1})(LearnerWorker)
        self.workers = [actor_cls.options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                                          scheduling_strategy=scheduling[rank] if scheduling else None
                                          ).remote(spec, rank)
                        for rank in range(spec.workers)]
        host, port = ray.get(self.workers[0].rendezvous_address.remote())
        layout = ray.get([w.setup.remote(host, port) for w in self.workers])
        self.data_ranks = [rank for rank, _ in layout]  # each worker's share of a batch
        self.data_parallel = layout[0][1]
        # Backends that gather weights over ranks need every worker in an export; the torch backend only rank 0.
        self._exporters = self.workers if spec.backend == "megatron" else self.workers[:1]

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
        total, count = self.get([w.sft_nll.remote(s) for w, s in zip(self.workers, shares)])[0]
        return total / max(count, 1.0)

    def update_reference(self) -> None:
        self.get([w.update_reference.remote() for w in self.workers])

    def reset_optimizer(self) -> None:
        self.get([w.reset_optimizer.remote() for w in self.workers])

    def save(self, path: str) -> None:
        """Rank 0 writes the checkpoint, with every rank's RNG state."""
        rngs = self.get([w.rng_state.remote() for w in self.workers])
        self.get([w.save.remote(path, rngs) for w in self.workers])

    def ping_refs(self) -> list:
        return [w.ping.remote() for w in self.workers]

    def export_bucket_refs(self, bucket_bytes: int) -> list:
        return self.get([w.export_bucket_refs.remote(bucket_bytes) for w in self._exporters])[0]

    def weight_digest(self) -> dict[str, str]:
        return self.get([w.weight_digest.remote() for w in self._exporters])[0]

    # Collective refit: rank 0 is the source (with DDP it holds the full weights; megatron gathers them over
    # every rank in named_weights(), so all exporters take part in layout and send). The join, leave and send
    # calls return refs: every member of the refit group must be in them at once.

    def refit_address(self) -> tuple[str, int]:
        return self.get(self.workers[0].refit_address.remote())

    def join_refit_group(self, generation: int, size: int, backend: str):
        return self.workers[0].join_refit_group.remote(generation, size, backend)

    def leave_refit_group(self):
        return self.workers[0].leave_refit_group.remote()

    def refit_layout(self, bucket_bytes: int, dtype: str | None) -> list[dict]:
        return self.get([w.refit_layout.remote(bucket_bytes, dtype) for w in self._exporters])[0]

    def send_weights(self) -> list:
        """Refs of the send: rank 0's first, then the other exporters' part in the gather."""
        return [w.send_weights.remote() for w in self._exporters]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
