"""The learner group: one Ray actor per data-parallel rank, joined in a torch.distributed group.

The orchestrator talks to the group, never to single workers: a global batch is split into equal
contiguous shares, every rank steps together, and rank 0 is the source of saves and weight exports.
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


class LearnerWorker:
    """One rank. Created through ray.remote by LearnerGroup."""

    def __init__(self, spec: LearnerSpec, rank: int):
        self.spec, self.rank = spec, rank
        self.backend: TorchBackend | None = None
        self.refit = RefitSource(ray.util.get_node_ip_address()) if rank == 0 else None
        if spec.num_gpus == 0:
            torch.set_num_threads(spec.torch_threads)

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 picks the address all ranks meet at: this node's IP and a free port."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def setup(self, host: str, port: int) -> None:
        world = self.spec.workers
        if world > 1:
            backend = "nccl" if self.spec.num_gpus > 0 else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                    world_size=world, timeout=timedelta(minutes=10))
        device = "cuda" if self.spec.num_gpus > 0 else "cpu"
        if self.spec.backend != "torch":
            raise ValueError(f"learner.backend={self.spec.backend!r} is not available; use 'torch'")
        self.backend = TorchBackend(self.spec.model_dir, self.spec.optim, device=device, dtype=self.spec.dtype,
                                    rank=self.rank, world_size=world, seed=self.spec.seed,
                                    reference_dir=self.spec.reference_dir)
        if self.spec.resume_dir:
            self.backend.load_training_state(self.spec.resume_dir)

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

    # Collective refit (rank 0 only): see learner/refit_source.py and orchestration/refit.py.

    def refit_address(self) -> tuple[str, int]:
        return self.refit.address()

    def join_refit_group(self, generation: int, size: int, backend: str) -> None:
        self.refit.join(generation, size, backend)

    def leave_refit_group(self) -> None:
        self.refit.leave()

    def refit_layout(self, bucket_bytes: int, dtype: str | None) -> list[dict]:
        return self.refit.set_layout(self.backend.named_weights(), bucket_bytes, dtype, self.backend.device)

    def send_weights(self) -> None:
        self.refit.send(self.backend.named_weights())


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
        ray.get([w.setup.remote(host, port) for w in self.workers])

    @property
    def size(self) -> int:
        return len(self.workers)

    def shards(self, samples: Sequence[TrainSample]) -> list[list[TrainSample]]:
        if len(samples) % self.size:
            raise ValueError(f"{len(samples)} samples do not split evenly over {self.size} learner workers")
        k = len(samples) // self.size
        return [list(samples[r * k : (r + 1) * k]) for r in range(self.size)]

    def train_step_async(self, samples: Sequence[TrainSample], loss_cfg: LossConfig) -> list:
        """Start one optimizer step; returns every rank's future (rank 0's first)."""
        return [w.train_step.remote(s, loss_cfg) for w, s in zip(self.workers, self.shards(samples))]

    def sft_nll(self, samples: Sequence[TrainSample]) -> float:
        """Mean token NLL of the chosen responses; pads the last share by splitting unevenly."""
        k = -(-len(samples) // self.size)
        shares = [list(samples[r * k : (r + 1) * k]) for r in range(self.size)]
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
        return self.get(self.workers[0].export_bucket_refs.remote(bucket_bytes))

    def weight_digest(self) -> dict[str, str]:
        return self.get(self.workers[0].weight_digest.remote())

    # Collective refit: rank 0 is the source (with DDP it holds the full weights; named_weights() is where a
    # sharded backend would gather them). The join, leave and send calls return refs: every member of the
    # refit group must be in them at once.

    def refit_address(self) -> tuple[str, int]:
        return self.get(self.workers[0].refit_address.remote())

    def join_refit_group(self, generation: int, size: int, backend: str):
        return self.workers[0].join_refit_group.remote(generation, size, backend)

    def leave_refit_group(self):
        return self.workers[0].leave_refit_group.remote()

    def refit_layout(self, bucket_bytes: int, dtype: str | None) -> list[dict]:
        return self.get(self.workers[0].refit_layout.remote(bucket_bytes, dtype))

    def send_weights(self):
        return self.workers[0].send_weights.remote()

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
