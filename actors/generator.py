"""Generator actor: samples responses from the policy M_t."""

from __future__ import annotations

from dataclasses import dataclass

from .engine_host import EngineHost
from .engines.protocol import GenerationRequest, GenerationResult


@dataclass
class GenerationBatch:
    results: list[GenerationResult]  # in request order


class GeneratorActor(EngineHost):
    def generate(self, requests: list[GenerationRequest]) -> GenerationBatch:
        return GenerationBatch(self._generate(requests))
