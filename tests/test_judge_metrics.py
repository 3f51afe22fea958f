"""Per-backend judge metrics (orchestration/judge_metrics.py): parse rate, score distribution, call latency."""

import time

import pytest
import ray

from actors.engines.protocol import GenerationResult
from actors.generator import GenerationBatch
from actors.judges.protocol import JudgeBatch, Judgement
from orchestration.batching import OutcomeStats
from orchestration.judge_metrics import CallLatency, count_scores, score_bin, score_metrics
from orchestration.rollout import PromptRecord, RolloutPipeline


@pytest.mark.parametrize("score,low,high,expected", [
    (0.0, 0, 5, "0"), (4.0, 0, 5, "4"), (4.5, 0, 5, "4"), (5.0, 0, 5, "5"), (0.5, 0, 5, "0"),
    (7.0, 1, 10, "7"),
    (0.0, 0, 1, "0"), (0.35, 0, 1, "0.3"), (1.0, 0, 1, "0.9"),  # not an integer scale: 10 equal bins
    (100.0, 0, 100, "90"), (15.0, 0, 100, "10"),  # an integer scale of more than 20 steps: 10 bins too
])
def test_score_bins(score, low, high, expected):
    assert score_bin(score, low, high) == expected


def test_counts_sum_like_outcome_stats_and_give_shares():
    a, b = OutcomeStats(), OutcomeStats()
    count_scores(a.judge_scores, [4.0, None, 5.0], 0, 5)
    count_scores(b.judge_scores, [4.5, 1.0], 0, 5)
    a += b
    assert a.judge_scores == {"judgements": 5, "valid": 4, "score_sum": 14.5, "bin/4": 2, "bin/5": 1, "bin/1": 1}
    m = score_metrics("model", a.judge_scores)
    assert m == {"judge/model/judgements": 5, "judge/model/parse_rate": 0.8, "judge/model/score_mean": 14.5 / 4,
                 "judge/model/score_share/1": 0.25, "judge/model/score_share/4": 0.5, "judge/model/score_share/5": 0.25}
    assert score_metrics("policy", {}) == {}  # no judgement in the batch (all verifier-scored): no metrics
    nothing = {}
    count_scores(nothing, [None, None], 0, 5)
    assert score_metrics("triton", nothing) == {"judge/triton/judgements": 2, "judge/triton/parse_rate": 0.0}


def test_call_latency_resets_when_taken():
    lat = CallLatency()
    assert lat.take("policy") == {}
    lat.add(0.5)
    lat.add(1.5)
    assert lat.take("policy", "meta_") == {"judge/policy/meta_calls": 2, "judge/policy/meta_latency_s": 1.0,
                                           "judge/policy/meta_latency_max_s": 1.5}
    assert lat.take("policy") == {}


class Pool(list):
    def __init__(self, impl):
        super().__init__([impl])
        self.impl, self.follows_policy = impl, True

    def call(self, replica, method, *args):
        return ray.put(getattr(self.impl, method)(*args))


class Generator:
    def generate(self, requests):
        return GenerationBatch([GenerationResult([ord("4")], "stop", 0) for _ in requests])


class SlowJudge:
    """Takes DELAY seconds per call: the pipeline's latency must see it."""

    DELAY = 0.2

    def judge(self, items):
        time.sleep(self.DELAY)
        return JudgeBatch([Judgement([3.0], ["Score: 3"], 0) for _ in items], 0)


class Tokens:
    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_the_pipeline_times_each_judge_call(ray_session):
    records = iter([PromptRecord(i, 0, [1], "What is 2 + 2?", "What is 2 + 2?", {}) for i in range(3)])
    pipeline = RolloutPipeline(Pool(Generator()), Pool(SlowJudge()), records, tokenizer=Tokens, sampling=None,
                               num_responses=2, num_evals=1, chunk_size=1, seed=1, iteration=0)
    while pipeline.submit_next():
        pass
    for _ in range(50):
        pipeline.advance(set(pipeline.pending()))
        pipeline.pop_ready()
        if not pipeline.pending():
            break
    m = pipeline.latency["judge"].take("policy")
    assert m["judge/policy/calls"] == 3  # one per chunk
    assert SlowJudge.DELAY <= m["judge/policy/latency_s"] <= m["judge/policy/latency_max_s"] < 30
    assert pipeline.latency["meta_judge"].take("policy") == {}  # no meta-judge here
