"""Generator actor: samples responses from the policy M_t."""

from __future__ import annotations

from dataclasses import dataclass

from .engine_host import EngineHost
from .engines.protocol import GenerationRequest, GenerationResult


@dataclass
class GenerationBatch:
    results: list[GenerationResult]  # in request order
    seconds: float  # engine busy time, for pool throughput


class GeneratorActor(EngineHost):
    def generate(self, requests: list[GenerationRequest]) -> GenerationBatch:
        results, seconds = self._generate(requests)
        return GenerationBatch(results, seconds)
