"""judge.backend=verifier: a judge pool with no model. Each item is scored by the verifier its sample names
(actors/verifiers); a verifier is deterministic, so the k judgements of an item are k equal scores, and
there are no tokens. It never follows the policy (FIXED) and cannot meta-judge.

VerifierJudge also scores the verifier-named samples of a run whose judge is an LLM: the orchestrator calls
it in its own process for those and sends the rest to the judge pool (orchestration/rollout.py).
"""

from __future__ import annotations

import uuid
from typing import Sequence

import ray

from actors.verifiers import NO_VERIFIER, Sample, to_score
from actors.verifiers.runner import VerifierRunner

from .protocol import FIXED, JudgeBatch, JudgeItem, JudgeSpec, Judgement, MetaBatch, MetaItem

NOT_NAMED = "no verifier: the sample's metadata names none (key 'verifier') and judge.default_verifier is unset"


class VerifierJudge:
    can_meta_judge = False

    def __init__(self, score_low: float, score_high: float):
        self.low, self.high = score_low, score_high  # the judge's scale (judge.score_low, judge.score_high)
        self.runner = VerifierRunner()

    def judge(self, items: Sequence[JudgeItem]) -> JudgeBatch:
        """k equal scores per item from its verifier; an item naming none gets k Nones (source NO_VERIFIER)."""
        # The verifier sees the last user turn, as the reference's IFEval verifier did.
        work = [(item.verifier, Sample(item.last_turn or item.prompt, item.response, item.metadata or {}))
                for item in items if item.verifier]
        verdicts = iter(self.runner.run(work))
        judgements = []
        for item in items:
            k = len(item.seeds)
            if not item.verifier:
                judgements.append(Judgement([None] * k, [NOT_NAMED] * k, FIXED, token_ids=[[] for _ in range(k)],
                                            verifier=NO_VERIFIER))
                continue
            verdict = next(verdicts)
            score = None if verdict.share is None else to_score(verdict.share, self.low, self.high)
            judgements.append(Judgement([score] * k, [verdict.note] * k, FIXED, token_ids=[[] for _ in range(k)],
                                        verifier=item.verifier))
        return JudgeBatch(judgements, 0)

    def meta_judge(self, items: Sequence[MetaItem]) -> MetaBatch:
        raise ValueError("judge.backend=verifier cannot meta-judge (a rule has no judgements to compare)")

    def close(self) -> None:
        self.runner.close()


class VerifierJudgeActor:
    """A judge replica with no engine: VerifierJudge behind what the pools ask of every replica (status, ping,
    weight_version). Never refit: its weight version is 0, FIXED in its judgements."""

    def __init__(self, judge: JudgeSpec):
        self.verifiers = VerifierJudge(judge.score_low, judge.score_high)
        self.incarnation = uuid.uuid4().hex

    @property
    def can_meta_judge(self) -> bool:
        return False

    def judge(self, items: Sequence[JudgeItem]) -> JudgeBatch:
        return self.verifiers.judge(items)

    def meta_judge(self, items: Sequence[MetaItem]) -> MetaBatch:
        return self.verifiers.meta_judge(items)

    # What the pools ask of every replica (orchestration/cluster.py).
    def status(self) -> tuple[str, int]:
        return self.incarnation, 0

    def weight_version(self) -> int:
        return 0

    def load_weights(self, version: int, *buckets) -> int:
        if buckets or version != 0:
            raise ValueError("a verifier judge has no weights (judge.backend=verifier does not follow the policy)")
        return 0

    def memory_plan(self) -> str:
        return "verifier judge: no model (rule-based rewards, actors/verifiers)"

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        return True
