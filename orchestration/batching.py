"""Exact global batches: every optimizer step sees exactly GBS good pairs (SPEC sections 3.6 and 4.5).

Scored prompts arrive in order as outcomes (an actor pair or a bad sample, and with the meta-judge maybe a
judge pair). Bad samples never enter a batch; they are counted against the batch whose pairs were being
collected when they arrived. Judge pairs go into a waiting line; each batch takes m = min(cap, waiting) of
them, oldest first, and GBS - m actor pairs, so the judge share is exact per global batch. Where a batch is
cut depends only on the order of the outcomes, never on when they arrived.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field, fields

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
    judge_top_scores: int = 0  # valid judgements at judge.score_high: a judge collapsing to the top score
    judged_responses: int = 0  # responses sent to the judge (those that ended properly)
    judge_shortened: int = 0  # judged on the last user turn only
    judge_trimmed: int = 0  # response cut from the end to fit the judge
    judge_too_long: int = 0  # could not fit the judge at all: no scores
    meta_verdicts: int = 0  # meta-judge comparisons asked
    meta_valid_verdicts: int = 0  # ... that named a winner
    judge_pairs: int = 0  # judge pairs accepted (Meta-Rewarding)
    judge_pairs_checked: int = 0  # ... whose two scores could be checked against ground truth (toy world)
    judge_pairs_right: int = 0  # ... whose chosen judgement's score is nearer the truth than the rejected one's
    judge_checked: int = 0  # judgements whose score could be checked against ground truth (toy world)
    judge_correct: int = 0
    # Per scoring source (LLM_SOURCE for the LLM judge, else the verifier's name): SOURCE_COUNTS of the responses
    # it scored. judgements/valid_judgements above count the LLM judge's alone.
    sources: dict = field(default_factory=dict)
    # The judge backend's judgements, per judgement (orchestration/judge_metrics.py: count, valid, score sum,
    # a histogram of the valid scores), for the judge/<backend>/ metrics.
    judge_scores: dict = field(default_factory=dict)

    def __iadd__(self, other: "OutcomeStats") -> "OutcomeStats":
        for f in fields(self):
            if f.name not in ("sources", "judge_scores"):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        for key, value in other.judge_scores.items():
            self.judge_scores[key] = self.judge_scores.get(key, 0) + value
        for source, counts in other.sources.items():
            mine = self.sources.setdefault(source, dict.fromkeys(SOURCE_COUNTS, 0))
            for key in SOURCE_COUNTS:
                mine[key] += counts.get(key, 0)
        return self

    def count_source(self, source: str, mean: float | None, low: float, high: float) -> None:
        """One response scored by `source`, with mean score `mean` (None: it gave none) on [low, high]."""
        c = self.sources.setdefault(source, dict.fromkeys(SOURCE_COUNTS, 0))
        c["responses"] += 1
        if mean is not None:
            c["scored"] += 1
            c["score_sum"] += mean
            c["score_sq"] += mean * mean
            c["top"] += mean == high
            c["bottom"] += mean == low


LLM_SOURCE = "judge"  # the LLM judge among OutcomeStats.sources (the other sources are verifier names)
# What OutcomeStats.sources counts per source: responses it was given, those it gave a score, the sum and
# sum of squares of those scores (each response's mean), and how many sat at judge.score_high / score_low.
STALE = "generated more than algorithm.max_policy_lag weight versions before the step that would train it"
SOURCE_COUNTS = ("responses", "scored", "score_sum", "score_sq", "top", "bottom")


@dataclass
class PromptOutcome:
    stats: OutcomeStats
    sample: TrainSample | None = None  # None: a bad sample
    judge_sample: TrainSample | None = None  # a judge pair from the meta-judge, if one was accepted
    epoch: int = 0
    # For logs and the generations table:
    prompt_text: str = ""
    chosen_text: str = ""
    rejected_text: str = ""
    reason: str = ""  # why a bad sample is bad
    version: int | None = None  # the weight version that generated (and, with a judge that follows the policy, judged) it

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "PromptOutcome":
        sample = lambda x: TrainSample(**x) if x is not None else None  # noqa: E731
        return PromptOutcome(**{**d, "stats": OutcomeStats(**d["stats"]), "sample": sample(d["sample"]),
                                "judge_sample": sample(d["judge_sample"])})


@dataclass
class Batch:
    outcomes: list[PromptOutcome]  # the actor pairs
    judge_samples: list[TrainSample] = field(default_factory=list)  # judge pairs; len(outcomes) + this = GBS
    stats: OutcomeStats = field(default_factory=OutcomeStats)  # over every prompt consumed, bad ones too
    judge_versions: list[int | None] = field(default_factory=list)  # the weight version of each judge pair

    @property
    def samples(self) -> list[TrainSample]:
        return [o.sample for o in self.outcomes] + self.judge_samples


class GlobalBatcher:
    def __init__(self, global_batch_size: int, judge_pair_cap: int = 0):
        self.gbs = global_batch_size
        self.cap = judge_pair_cap  # round(meta_judge_pcnt * GBS); 0 without the meta-judge
        self._queue: deque[PromptOutcome] = deque()
        self._judge_waiting: deque[TrainSample] = deque()  # judge pairs of outcomes already consumed
        self._judge_versions: deque[int | None] = deque()  # the version of each waiting judge pair

    def add(self, outcome: PromptOutcome) -> None:
        self._queue.append(outcome)

    def _cut(self) -> tuple[int, int] | None:
        """(outcomes to consume, judge pairs to take) for the next batch, or None if it cannot be filled."""
        actor, judge = 0, len(self._judge_waiting)
        for k, outcome in enumerate(self._queue, start=1):
            actor += outcome.sample is not None
            judge += outcome.judge_sample is not None
            if actor + min(self.cap, judge) >= self.gbs:
                return k, self.gbs - min(actor, self.gbs)
        return None

    def ready(self) -> bool:
        return self._cut() is not None

    @property
    def buffered_pairs(self) -> int:
        return sum(o.sample is not None for o in self._queue)

    @property
    def waiting_judge_pairs(self) -> list[TrainSample]:
        """Judge pairs not yet trained on, in order (part of the run's state)."""
        return list(self._judge_waiting) + [o.judge_sample for o in self._queue if o.judge_sample is not None]

    def pop(self) -> Batch:
        cut = self._cut()
        if cut is None:
            raise RuntimeError(f"only {self.buffered_pairs} pairs buffered, a batch needs {self.gbs}")
        consume, take_judge = cut
        batch = Batch([])
        for _ in range(consume):
            outcome = self._queue.popleft()
            batch.stats += outcome.stats
            if outcome.sample is not None:
                batch.outcomes.append(outcome)
            if outcome.judge_sample is not None:
                self._judge_waiting.append(outcome.judge_sample)
                self._judge_versions.append(outcome.version)
        batch.judge_samples = [self._judge_waiting.popleft() for _ in range(take_judge)]
        batch.judge_versions = [self._judge_versions.popleft() for _ in range(take_judge)]
        return batch

    def drop_older_than(self, version: int) -> int:
        """Streaming refits: drop every pair (actor or judge) generated by a weight version below `version`;
        their prompts' stats stay. Returns how many pairs were dropped."""
        dropped = 0
        for outcome in self._queue:
            if outcome.version is not None and outcome.version < version:
                dropped += (outcome.sample is not None) + (outcome.judge_sample is not None)
                if outcome.sample is not None:
                    outcome.reason = STALE
                outcome.sample = outcome.judge_sample = None
        keep = [(s, v) for s, v in zip(self._judge_waiting, self._judge_versions) if v is None or v >= version]
        dropped += len(self._judge_waiting) - len(keep)
        self._judge_waiting = deque(s for s, _ in keep)
        self._judge_versions = deque(v for _, v in keep)
        return dropped

    def state(self) -> dict:
        """Pairs made but not yet trained on, and judge pairs waiting: part of a checkpoint."""
        return {"queue": [o.to_dict() for o in self._queue], "judge_waiting": [asdict(s) for s in self._judge_waiting],
                "judge_versions": list(self._judge_versions)}

    def restore(self, state: dict) -> None:
        self._queue = deque(PromptOutcome.from_dict(d) for d in state["queue"])
        self._judge_waiting = deque(TrainSample(**d) for d in state["judge_waiting"])
        self._judge_versions = deque(state.get("judge_versions", [None] * len(self._judge_waiting)))

    def drain(self) -> tuple[list[PromptOutcome], list[TrainSample]]:
        """Everything left when the iteration ends: (outcomes, waiting judge pairs). These go unused."""
        rest, judges = list(self._queue), self.waiting_judge_pairs
        self._queue.clear()
        self._judge_waiting.clear()
        self._judge_versions.clear()
        return rest, judges
