"""What generator and judge actors share: an engine and versioned weight loads."""

from __future__ import annotations

from dataclasses import dataclass

import ray
import torch

from .engines import make_engine
from .engines.protocol import GenerationRequest, GenerationResult, WeightBucket


@dataclass(frozen=True)
class EngineSpec:
    model_dir: str
    kind: str = "torch"
    device: str = "cpu"
    dtype: str = "float32"
    max_batch_size: int = 64
    max_seq_len: int | None = None
    torch_threads: int = 1  # CPU threads per replica; several replicas share the machine's cores
    weight_version: int = 0  # the version the weights in model_dir are (a resumed run starts above 0)


class EngineHost:
    """Created with a "health" concurrency group (see `ping`). A replica Ray restarts after a crash comes
    back with the weights of `spec`; the orchestrator loads the current version into it before it serves."""

    def __init__(self, spec: EngineSpec):
        if spec.device == "cpu":
            torch.set_num_threads(spec.torch_threads)
        self.engine = make_engine(spec.kind, spec.model_dir, device=spec.device, dtype=spec.dtype,
                                  max_batch_size=spec.max_batch_size, max_seq_len=spec.max_seq_len,
                                  weight_version=spec.weight_version)

    def load_weights(self, version: int, *buckets: dict) -> int:
        """Refit: Ray resolves each bucket ObjectRef argument to a zero-copy view; copy it in place."""
        self.engine.load_weights([WeightBucket(**b) for b in buckets], version)
        return self.engine.weight_version

    def weight_version(self) -> int:
        return self.engine.weight_version

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
        return self.engine.generate(requests) if requests else []
