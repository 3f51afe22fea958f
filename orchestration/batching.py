"""Exact global batches: every optimizer step sees exactly GBS good pairs (SPEC section 3, step 6).

Scored prompts arrive in order as outcomes (a pair, or a bad sample). Bad samples never enter a batch;
they are counted against the batch whose pairs were being collected when they arrived.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields

from learner.types import TrainSample


@dataclass
class OutcomeStats:
    """Per-prompt counts, summed over the prompts a batch consumed."""

    prompts: int = 0
    bad_samples: int = 0
    responses: int = 0
    unended: int = 0
    judgements: int = 0
    valid_judgements: int = 0
    judged_responses: int = 0  # responses sent to the judge (those that ended properly)
    judge_shortened: int = 0  # judged on the last user turn only
    judge_trimmed: int = 0  # response cut from the end to fit the judge
    judge_too_long: int = 0  # could not fit the judge at all: no scores
    judge_checked: int = 0  # judgements whose score could be checked against ground truth (toy world)
    judge_correct: int = 0

    def __iadd__(self, other: "OutcomeStats") -> "OutcomeStats":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


@dataclass
class PromptOutcome:
    stats: OutcomeStats
    sample: TrainSample | None = None  # None: a bad sample
    epoch: int = 0
    # For logs and the generations table:
    prompt_text: str = ""
    chosen_text: str = ""
    rejected_text: str = ""
    reason: str = ""  # why a bad sample is bad


@dataclass
class Batch:
    outcomes: list[PromptOutcome]  # exactly GBS pairs
    stats: OutcomeStats = field(default_factory=OutcomeStats)  # over every prompt consumed, bad ones too

    @property
    def samples(self) -> list[TrainSample]:
        return [o.sample for o in self.outcomes]


class GlobalBatcher:
    def __init__(self, global_batch_size: int):
        self.gbs = global_batch_size
        self._queue: deque[PromptOutcome] = deque()
        self._pairs = 0

    def add(self, outcome: PromptOutcome) -> None:
        self._queue.append(outcome)
        self._pairs += outcome.sample is not None

    def ready(self) -> bool:
        return self._pairs >= self.gbs

    @property
    def buffered_prompts(self) -> int:
        return len(self._queue)

    @property
    def buffered_pairs(self) -> int:
        return self._pairs

    def pop(self) -> Batch:
        if not self.ready():
            raise RuntimeError(f"only {self._pairs} pairs buffered, a batch needs {self.gbs}")
        batch = Batch([])
        while len(batch.outcomes) < self.gbs:
            outcome = self._queue.popleft()
            batch.stats += outcome.stats
            if outcome.sample is not None:
                batch.outcomes.append(outcome)
                self._pairs -= 1
        return batch

    def drain(self) -> list[PromptOutcome]:
        """Everything left (fewer than GBS pairs): the iteration is over and these go unused."""
        rest = list(self._queue)
        self._queue.clear()
        self._pairs = 0
        return rest
