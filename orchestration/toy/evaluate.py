"""Ground-truth checks for the toy world: greedy task accuracy and the true rubric score of a response."""

from __future__ import annotations

from typing import Callable

from actors.engines.protocol import GenerationRequest, GenerationResult, SamplingParams

from ..chat import ChatRenderer
from ..data import JsonlDataset
from . import task


class ToyEvaluator:
    def __init__(self, renderer: ChatRenderer, held_out: JsonlDataset, max_new_tokens: int = 8):
        self.tokenizer = renderer.tokenizer
        self.items = [(renderer.prompt_ids(c.prompt_messages), c.metadata["answer"]) for c in held_out]
        self.sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)

    def task_accuracy(self, generate: Callable[[list[GenerationRequest]], list[GenerationResult]]) -> float:
        """Fraction of held-out questions the policy answers exactly right, greedy. `generate` serves the
        requests (the run passes Pools.generate: spread over the pool, with health checks and restarts)."""
        results = generate([GenerationRequest(ids, self.sampling) for ids, _ in self.items])
        correct = sum(task.is_correct(self.tokenizer.decode(r.token_ids, skip_special_tokens=True), answer)
                      for r, (_, answer) in zip(results, self.items))
        return correct / len(self.items)

    @staticmethod
    def judge_truth(metadata: dict, response_text: str) -> float | None:
        answer = metadata.get("answer")
        return None if answer is None else float(task.rubric_score(response_text, answer))
