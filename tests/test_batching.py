"""Exact global batches: bad samples never fill a slot; judge pairs take an exact, capped share."""

import random

from learner.types import TrainSample
from orchestration.batching import GlobalBatcher, OutcomeStats, PromptOutcome


def outcome(i, good, judge=False):
    sample = TrainSample([i], [1], [2]) if good else None
    judge_sample = TrainSample([1000 + i], [3], [4]) if judge else None
    return PromptOutcome(OutcomeStats(prompts=1, bad_samples=int(not good), responses=4), sample, judge_sample)


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
    assert not batcher.ready() and batcher.drain() == ([], [])


def test_judge_pairs_take_an_exact_capped_share_over_many_batches():
    gbs, cap = 20, round(0.15 * 20)  # 3 judge pairs at most per batch
    rng = random.Random(0)
    stream = [outcome(i, good=rng.random() < 0.6, judge=rng.random() < 0.3) for i in range(5000)]
    batcher = GlobalBatcher(gbs, judge_pair_cap=cap)
    batches = []
    for o in stream:
        batcher.add(o)
        while batcher.ready():
            batches.append(batcher.pop())
    assert len(batches) > 100
    for b in batches:
        assert len(b.samples) == gbs  # exact
        assert len(b.judge_samples) <= cap
        assert all(s.rejected_ids is not None for s in b.samples)
    # Judge pairs are plentiful here (30% of prompts), so every batch takes exactly the cap.
    assert all(len(b.judge_samples) == cap for b in batches)
    # Nothing is lost or duplicated: everything popped or still waiting, in stream order.
    used = [s.prompt_ids[0] for b in batches for s in b.judge_samples] + \
           [s.prompt_ids[0] for s in batcher.waiting_judge_pairs]
    assert used == [o.judge_sample.prompt_ids[0] for o in stream if o.judge_sample is not None]


def test_scarce_judge_pairs_fill_what_they_can_and_the_cut_ignores_arrival_timing():
    gbs, cap = 8, 2
    stream = [outcome(i, good=i % 3 != 0, judge=i % 10 == 0) for i in range(400)]

    def run(chunk):
        batcher, batches = GlobalBatcher(gbs, cap), []
        for start in range(0, len(stream), chunk):
            for o in stream[start : start + chunk]:
                batcher.add(o)
            while batcher.ready():
                batches.append(batcher.pop())
        return [[s.prompt_ids[0] for s in b.samples] for b in batches]

    one_by_one, in_chunks = run(1), run(37)
    assert one_by_one == in_chunks  # the same batches whatever the arrival pattern
    assert all(len(b) == gbs for b in one_by_one)
    assert any(any(x >= 1000 for x in b) for b in one_by_one)  # some judge pairs were used
