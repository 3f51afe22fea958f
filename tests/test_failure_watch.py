"""The failure-mode figures of Self-Rewarding / Meta-Rewarding: judge collapse to the top score, length
explosion, judge vs implicit-reward agreement and the share of batches with judge pairs, per step
(train/), per iteration (IterationSummary.row(), iter/ metrics) and in the end-of-run table; and that
checkpoints written before these existed still load."""

import dataclasses
from types import SimpleNamespace

import pytest

from actors.engines.protocol import GenerationResult
from actors.judges.protocol import Judgement
from learner.types import LossConfig, TrainSample
from orchestration.algorithms.iterative import IterationSummary
from orchestration.algorithms.self_rewarding import SelfRewarding
from orchestration.batching import Batch, OutcomeStats, PromptOutcome
from orchestration.config import load_config
from orchestration.report import format_table
from orchestration.judge_metrics import CallLatency
from orchestration.rollout import PoolCounters, PromptRecord, ScoredPrompt

NEW_ROW_KEYS = ("top_score_share", "chosen_length", "rejected_length", "reward_agreement",
                "judge_pair_batch_share")


class FakeJudges:
    follows_policy = True

    def __len__(self):
        return 1


class FakeMetrics:
    def __init__(self):
        self.rows = []

    def log(self, row, step):
        self.rows.append((step, row))

    def table(self, *args):
        pass


def make_self_rewarding(tmp_path, *overrides):
    cfg = load_config([f"output_dir={tmp_path}", *overrides])
    ctx = SimpleNamespace(evaluator=None, renderer=SimpleNamespace(stop_strings=()), metrics=FakeMetrics(),
                          log=lambda *a: None)
    pools = SimpleNamespace(judges=FakeJudges(), actor_restarts=0)
    return SelfRewarding(cfg, ctx, pools=pools, checkpoints=None, reference_dir="")


def scored(scores_per_response):
    record = PromptRecord(0, 0, [1, 5], "question", "question", {}, None)
    responses = [GenerationResult([9] * (i + 1) + [2], "stop", 0) for i in range(len(scores_per_response))]
    judgements = [Judgement(list(scores), [""] * len(scores), weight_version=0) for scores in scores_per_response]
    return ScoredPrompt(record, responses, [f"r{i}" for i in range(len(responses))], judgements)


@pytest.mark.parametrize("high", [5.0, 10.0])
def test_top_scores_are_valid_judgements_at_judge_score_high(tmp_path, high):
    sr = make_self_rewarding(tmp_path, f"judge.score_high={high}")
    summary = IterationSummary(1)
    # 6 valid judgements (None is no score), 3 of them at score_high; 4.0 and 5.0 below a high of 10 are not.
    [outcome] = sr._outcomes(scored([[high, high, None], [high, 3.0, 4.0], [2.0, None, None]]), summary)
    assert outcome.stats.valid_judgements == 6 and outcome.stats.judge_top_scores == 3
    sr._outcomes(scored([[1.0, 2.0], [high, high]]), summary)
    assert summary.stats.judge_top_scores == 5 and summary.stats.valid_judgements == 10
    assert summary.row()["top_score_share"] == pytest.approx(0.5)


def test_outcome_stats_sum_the_top_score_counter():
    total = OutcomeStats()
    total += OutcomeStats(prompts=1, valid_judgements=3, judge_top_scores=2)
    total += OutcomeStats(prompts=1, valid_judgements=4, judge_top_scores=1)
    assert (total.valid_judgements, total.judge_top_scores) == (7, 3)


def pair(chosen_len, rejected_len):
    return PromptOutcome(OutcomeStats(prompts=1), TrainSample([1], [3] * chosen_len, [4] * rejected_len, 4.0, 1.0))


def step(sr, summary, outcomes, judge_samples, acc, stats):
    batch = Batch(outcomes, judge_samples, stats)
    metrics = {"loss": 1.0, "acc": acc} if acc is not None else {"loss": 1.0}
    # the pipeline's real counters and latency clocks (a hand-made fake drifted from them once)
    pipeline = SimpleNamespace(counters=PoolCounters(), latency={"judge": CallLatency(), "meta_judge": CallLatency()})
    sr._log_step(metrics, batch, summary, 1.0, 1.0, pipeline, LossConfig())
    return sr.ctx.metrics.rows[-1][1]


def test_steps_give_actor_lengths_agreement_and_judge_pair_batches_and_resume_the_same(tmp_path):
    sr = make_self_rewarding(tmp_path, "algorithm=meta_rewarding")
    summary = IterationSummary(1, judge_pair_batches=0)  # what SelfRewarding._iteration sets with the meta-judge
    sr.summaries = [summary]
    judge_pair = TrainSample([1], [7] * 50, [8] * 60, 5.0, 1.0)  # long judgements: not actor responses
    first = step(sr, summary, [pair(2, 4), pair(4, 8)], [judge_pair], 0.0,
                 OutcomeStats(prompts=3, valid_judgements=8, judge_top_scores=2, judgements=9))
    assert first["train/chosen_response_tokens"] == 3 and first["train/rejected_response_tokens"] == 6
    assert first["train/reward_agreement"] == first["train/acc"] == 0.0
    assert first["train/judge_top_score_share"] == 0.25
    second = step(sr, summary, [pair(10, 1), pair(6, 1), pair(5, 1)], [], 0.75,
                  OutcomeStats(prompts=3, judgements=9))
    assert second["train/chosen_response_tokens"] == 7 and second["train/rejected_response_tokens"] == 1
    assert "train/judge_top_score_share" not in second  # no valid judgement in the batch's prompts
    row = summary.row()
    assert row["chosen_length"] == pytest.approx((2 + 4 + 10 + 6 + 5) / 5)
    assert row["rejected_length"] == pytest.approx((4 + 8 + 1 + 1 + 1) / 5)
    assert row["reward_agreement"] == pytest.approx(0.375)  # the first step's 0 is kept
    assert row["judge_pair_batch_share"] == 0.5 and summary.pairs_trained == 6
    # A checkpoint's summary (dataclasses.asdict, then JSON) gives the same row.
    assert IterationSummary.from_dict(dataclasses.asdict(summary)).row() == row


def test_without_the_meta_judge_there_is_no_judge_pair_batch_share(tmp_path):
    sr = make_self_rewarding(tmp_path)
    summary = IterationSummary(1)
    sr.summaries = [summary]
    step(sr, summary, [pair(2, 2)], [], 0.5, OutcomeStats(prompts=1))
    assert summary.row()["judge_pair_batch_share"] is None
    assert summary.row()["reward_agreement"] == 0.5


def test_sft_steps_give_no_agreement(tmp_path):
    summary = IterationSummary(0)
    sr = make_self_rewarding(tmp_path)
    sr.summaries = [summary]
    step(sr, summary, [pair(2, 2)], [], None, OutcomeStats(prompts=1))
    assert summary.row()["reward_agreement"] is None


def test_old_checkpoint_summaries_load_with_the_defaults():
    old = dataclasses.asdict(IterationSummary(2, steps=3, pairs_trained=24))
    for key in ("actor_pairs", "chosen_tokens", "rejected_tokens", "agreement_sum", "agreement_steps",
                "judge_pair_batches"):
        del old[key]
    del old["stats"]["judge_top_scores"]
    row = IterationSummary.from_dict(old).row()
    assert all(row[k] is None for k in NEW_ROW_KEYS)
    assert PromptOutcome.from_dict(PromptOutcome(OutcomeStats(prompts=1)).to_dict()).stats.judge_top_scores == 0


def test_iteration_rows_are_logged_as_numbers_only(tmp_path):
    sr = make_self_rewarding(tmp_path)
    sr.step = 7
    summary = IterationSummary(1, steps=2, actor_pairs=4, chosen_tokens=40, rejected_tokens=20, checkpoint="x")
    sr._log_row(summary, "iter")
    logged_step, logged = sr.ctx.metrics.rows[-1]
    assert logged_step == 7
    assert logged["iter/chosen_length"] == 10 and logged["iter/rejected_length"] == 5
    assert "iter/checkpoint" not in logged and "iter/task_accuracy" not in logged  # a string, a None
    assert all(isinstance(v, (int, float)) for v in logged.values())


def test_table_shows_the_new_columns():
    rows = [{"iteration": 1, "steps": 2, "top_score_share": 0.625, "chosen_length": 12.34,
             "rejected_length": 8.06, "reward_agreement": 0.5, "judge_pair_batch_share": 0.25}]
    header, _, body = format_table(rows).splitlines()
    for title in ("top score", "chosen len", "rejected len", "agree", "jp batches"):
        assert title in header
    assert body.split() == ["1", "62.5%", "12.3", "8.1", "50.0%", "25.0%", "2"]
    # Columns no row has a value for are left out (SPIN has no judge, an SFT iteration no agreement).
    header = format_table([{"iteration": 0, "steps": 1, "chosen_length": 3.0}]).splitlines()[0]
    assert "chosen len" in header and "top score" not in header and "jp batches" not in header
