"""Exact global batches: bad samples never fill a slot and are counted against the batch."""

from learner.types import TrainSample
from orchestration.batching import GlobalBatcher, OutcomeStats, PromptOutcome


def outcome(i, good):
    sample = TrainSample([i], [1], [2]) if good else None
    return PromptOutcome(OutcomeStats(prompts=1, bad_samples=int(not good), responses=4), sample)


def test_batches_hold_exactly_gbs_pairs_in_order_and_count_bad_samples():
    batcher = GlobalBatcher(3)
    pattern = [True, False, True, False, False, True, True, True, False, True]
    for i, good in enumerate(pattern):
        batcher.add(outcome(i, good))
    first = batcher.pop()
    assert [s.prompt_ids[0] for s in first.samples] == [0, 2, 5]
    assert first.stats.prompts == 6 and first.stats.bad_samples == 3
    second = batcher.pop()
    assert [s.prompt_ids[0] for s in second.samples] == [6, 7, 9]
    assert second.stats.prompts == 4 and second.stats.bad_samples == 1
    assert not batcher.ready() and batcher.drain() == []
