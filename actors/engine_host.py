"""What generator and judge actors share: an engine and versioned weight loads."""

from __future__ import annotations

import time
import uuid
import warnings

import ray
import torch

from refit_wire import pack_buckets

from .engines import EngineSpec, make_engine
from .engines.protocol import BucketLayout, GenerationRequest, GenerationResult, WeightBucket
from .ipc_receiver import IpcReceiver
from .refit_receiver import RefitReceiver


class StaleWeights(RuntimeError):
    """A replica was asked to serve before it got whole current weights (it was restarted, or a collective
    refit failed part way)."""


class EngineHost:
    """Created with a "health" concurrency group (see `ping`). A replica that Ray restarts after a crash
    comes back with the weights of `spec`, which may be older than what the run serves: it refuses work
    (StaleWeights) until `load_weights` (or a collective refit) has given it weights, so it never answers
    with stale weights."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        if spec.device == "cpu":
            torch.set_num_threads(spec.torch_threads)
        self.engine = make_engine(spec)
        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        in_actor = ctx is not None and ctx.get_actor_id() is not None  # also built in-process (tests, tools)
        self.stale = in_actor and _was_restarted(ctx)
        self.incarnation = uuid.uuid4().hex  # new in every process Ray starts for this replica
        # An engine whose rank workers are the refit group's members (trtllm) receives there; others here.
        own = getattr(self.engine, "refit_receiver", None)
        self.refit = own() if own is not None else RefitReceiver()
        self.ipc = IpcReceiver()  # cluster.refit_transport=cuda_ipc: the learner's buffer, mapped once

    def load_weights(self, version: int, *buckets: dict) -> int:
        """Refit: Ray resolves each bucket ObjectRef argument to a zero-copy view; copy it in place. With no
        buckets, `version` must be the one the replica was created with (a restarted replica confirmed)."""
        if buckets:
            self.engine.load_weights([WeightBucket(**b) for b in buckets], version)
        elif version != self.engine.weight_version:
            raise ValueError(f"no weights given for version {version}; this replica has {self.engine.weight_version}")
        self.stale = False
        return self.engine.weight_version

    def call_at(self, version: int, method: str, args: tuple, *buckets: dict):
        """Streaming refits: run `method(*args)` at weight `version`, first loading `buckets` (that version's)
        if this replica serves another one. The swap happens between calls, never inside one, so every
        response and judgement is made by one version. Returns (result, seconds spent loading or None)."""
        seconds = None
        if self.stale or self.engine.weight_version != version:
            start = time.perf_counter()
            self.load_weights(version, *buckets)
            seconds = time.perf_counter() - start
        return getattr(self, method)(*args), seconds

    def export_weights(self, bucket_bytes: int) -> tuple[int, list]:
        """(version, bucket refs) of the weights served now, for a restarted peer replica to load (the
        collective transport keeps no buckets). The refs are owned by this replica: load them at once."""
        if self.stale:
            raise StaleWeights("this replica was restarted and has no current weights to give")
        buckets = pack_buckets(self.engine.named_parameters_hf().items(), bucket_bytes)
        return self.engine.weight_version, [ray.put(b) for b in buckets]

    # Collective refit (actors/refit_receiver.py): the orchestrator builds the group and drives each refit.

    def join_refit_group(self, host: str, port: int, generation: int, rank: int, size: int, backend: str) -> str:
        """Join the refit group; returns the dtype the weights are held in (the source casts to it)."""
        self.refit.join(host, port, generation, rank, size, backend)
        return self.spec.dtype

    def leave_refit_group(self) -> None:
        self.refit.leave()

    def refit_group(self) -> int:
        """The generation of the refit group this replica is in; 0 for none (a restarted replica)."""
        return self.refit.generation

    def prepare_refit(self, layout: list[BucketLayout]) -> None:
        self.refit.prepare(layout, self.engine, torch.device(self.spec.device))

    def receive_weights(self, version: int) -> int:
        """One collective refit: every bucket lands in place, then the replica serves `version`. A refit that
        fails part way leaves mixed weights, so the replica refuses work until it gets whole ones."""
        self.stale = True
        self.refit.receive(self.engine)
        self.engine.weight_version = version
        self.stale = False
        return self.engine.weight_version

    def refit_dtype(self) -> str:
        """The dtype the weights are held in (a refit source casts to it)."""
        return self.spec.dtype

    def check_ipc(self, export: dict) -> None:
        """CUDA IPC refit set-up: map the learner's buffer and check its layout, loading nothing."""
        self.ipc.map(self.engine, torch.device(self.spec.device), export)

    def load_ipc(self, version: int, export: dict | str) -> tuple[str, int]:
        """CUDA IPC refit (actors/ipc_receiver.py): copy the learner's exported weights in, then serve `version`;
        returns `status()` (the refit's one call also tells a restart). `export`: the export, or the token of
        the one mapped before (actors/ipc_receiver.py). A copy that fails part way leaves mixed
        weights, so the replica refuses work until it gets whole ones."""
        self.ipc.map(self.engine, torch.device(self.spec.device), export)
        self.stale = True
        self.ipc.copy()
        self.engine.weight_version = version
        self.stale = False
        return self.status()

    def weight_version(self) -> int:
        """The version served; -1 while a restarted replica waits for its weights."""
        return -1 if self.stale else self.engine.weight_version

    def memory_plan(self) -> str:
        """What the engine reserved for its KV cache, in one line (the start-up log shows it)."""
        plan = getattr(self.engine, "cache_plan", None)
        return str(plan) if plan is not None else ""

    def status(self) -> tuple[str, int]:
        """(incarnation, weight_version): a caller that remembers the incarnation sees every restart, even
        one that happened while no call was in flight."""
        return self.incarnation, self.weight_version()

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        """Answers while a generation runs (its own thread): tells a busy replica from a hung one."""
        return True

    def weight_digest(self) -> dict[str, str]:
        """SHA-1 of every parameter's bytes under Hugging Face names: lets a caller verify a refit."""
        import hashlib

        return {name: hashlib.sha1(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
                for name, t in self.engine.named_parameters_hf().items()}

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if self.stale:
            raise StaleWeights("this replica was restarted and has not been given the current weights yet")
        return self.engine.generate(requests) if requests else []


def _was_restarted(ctx) -> bool:
    """Whether Ray restarted this actor. Ray's property reads its own deprecated `actor_id` (three warning lines
    per replica on the console): the warnings are its, not the user's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(ctx.was_current_actor_reconstructed)
