"""What generator and judge actors share: an engine and versioned weight loads."""

from __future__ import annotations

from dataclasses import dataclass

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


class EngineHost:
    def __init__(self, spec: EngineSpec, weight_version: int = 0):
        if spec.device == "cpu":
            torch.set_num_threads(spec.torch_threads)
        self.engine = make_engine(spec.kind, spec.model_dir, device=spec.device, dtype=spec.dtype,
                                  max_batch_size=spec.max_batch_size, max_seq_len=spec.max_seq_len,
                                  weight_version=weight_version)

    def load_weights(self, version: int, *buckets: dict) -> int:
        """Refit: Ray resolves each bucket ObjectRef argument to a zero-copy view; copy it in place."""
        self.engine.load_weights([WeightBucket(**b) for b in buckets], version)
        return self.engine.weight_version

    def weight_version(self) -> int:
        return self.engine.weight_version

    def weight_digest(self) -> dict[str, str]:
        """SHA-1 of every parameter's bytes under Hugging Face names: lets a caller verify a refit."""
        import hashlib

        return {name: hashlib.sha1(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
                for name, t in self.engine.named_parameters_hf().items()}

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return self.engine.generate(requests) if requests else []
