"""judge.backend=verifier: a judge pool with no model. Each item is scored by the verifier its sample names
(actors/verifiers); a verifier is deterministic, so the k judgements of an item are k equal scores, and
there are no tokens. It never follows the policy (FIXED) and cannot meta-judge.

VerifierJudge also scores the verifier-named samples of a run whose judge is an LLM: the orchestrator calls
it in its own process for those and sends the rest to the judge pool (orchestration/rollout.py).
"""

from __future__ import annotations

from typing import Sequence


from actors.verifiers import NO_VERIFIER, Sample, to_score
from actors.fixed_host import FixedHost
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


class VerifierJudgeActor(FixedHost):
    """A judge replica with no engine: VerifierJudge; never refit (FixedHost)."""

    backend = "verifier"

    def __init__(self, judge: JudgeSpec):
        super().__init__()
        self.verifiers = VerifierJudge(judge.score_low, judge.score_high)

    @property
    def can_meta_judge(self) -> bool:
        return False

    def judge(self, items: Sequence[JudgeItem]) -> JudgeBatch:
        return self.verifiers.judge(items)

    def meta_judge(self, items: Sequence[MetaItem]) -> MetaBatch:
        return self.verifiers.meta_judge(items)

    def memory_plan(self) -> str:
        return "verifier judge: no model (rule-based rewards, actors/verifiers)"
