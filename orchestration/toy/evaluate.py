"""Ground-truth checks for the toy world: greedy task accuracy, held-out judge accuracy, and the true rubric
score of a response."""

from __future__ import annotations

import random
from typing import Callable

from actors.engines.protocol import GenerationRequest, GenerationResult, SamplingParams
from actors.judges.parsing import parse_score

from ..chat import ChatRenderer
from ..data import JsonlDataset
from . import task

Generate = Callable[[list[GenerationRequest]], list[GenerationResult]]
PROBE_SEED = 7  # the held-out judge probes (answers to grade) and their sampling streams, fixed per world


class ToyEvaluator:
    def __init__(self, renderer: ChatRenderer, held_out: JsonlDataset, *, judge_template: str = task.JUDGE_TEMPLATE,
                 judge_sampling: SamplingParams | None = None, score_regex: str | None = None,
                 score_match: str = "first", score_range: tuple[float, float] = (0.0, 5.0), max_new_tokens: int = 8):
        self.tokenizer = renderer.tokenizer
        self.items = [(renderer.prompt_ids(c.prompt_messages), c.metadata["answer"]) for c in held_out]
        self.sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
        # One answer of every quality (task.candidate_answers) per held-out question, graded with the run's own
        # judge sampling: the judge as Self-Rewarding uses it, on data no iteration trains on. The request
        # seeds are fixed, so two models are compared on the same random streams.
        rng = random.Random(PROBE_SEED)
        self.probes = []
        for c in held_out:
            question, answer = ChatRenderer.user_text(c.prompt_messages, False), c.metadata["answer"]
            response = task.candidate_answers(rng, answer)
            prompt = renderer.prompt_ids([{"role": "user", "content": judge_template.format(
                prompt=question, response=response)}])
            self.probes.append((prompt, task.rubric_score(response, answer)))
        self.judge_sampling = judge_sampling or SamplingParams(temperature=0.0, max_new_tokens=96)
        self.score_regex, self.score_match, self.score_range = score_regex, score_match, score_range

    def task_accuracy(self, generate: Generate) -> float:
        """Fraction of held-out questions the policy answers exactly right, greedy. `generate` serves the
        requests (the run passes Pools.generate: spread over the pool, with health checks and restarts)."""
        results = generate([GenerationRequest(ids, self.sampling) for ids, _ in self.items])
        correct = sum(task.is_correct(self.tokenizer.decode(r.token_ids, skip_special_tokens=True), answer)
                      for r, (_, answer) in zip(results, self.items))
        return correct / len(self.items)

    def judge_accuracy(self, generate: Generate) -> float:
        """Fraction of held-out probes the policy, as judge, gives exactly the true rubric score (an unparsed
        judgement counts as wrong)."""
        results = generate([GenerationRequest(ids, self.judge_sampling, seed=PROBE_SEED * 1_000_003 + i)
                            for i, (ids, _) in enumerate(self.probes)])
        kwargs = {"regex": self.score_regex} if self.score_regex else {}
        low, high = self.score_range
        right = 0
        for r, (_, truth) in zip(results, self.probes):
            score = parse_score(self.tokenizer.decode(r.token_ids, skip_special_tokens=True), low=low, high=high,
                                match=self.score_match, **kwargs)
            right += score == truth
        return right / len(self.probes)

    @staticmethod
    def judge_truth(metadata: dict, response_text: str) -> float | None:
        answer = metadata.get("answer")
        return None if answer is None else float(task.rubric_score(response_text, answer))
