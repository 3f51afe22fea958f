"""The streaming-refit schedule (orchestration/streaming.py) is a function of the data, not of timing: which
version generates each chunk and which pairs train at each step come out the same whether the learner is
fast or slow, the lag bound holds, and a checkpointed schedule continues exactly."""

import json
from collections import deque

import pytest

from learner.types import TrainSample
from orchestration.batching import STALE, GlobalBatcher, OutcomeStats, PromptOutcome
from orchestration.streaming import Schedule

# Per chunk, per prompt: does the prompt give a pair (1) or a bad sample (0)? Uneven on purpose.
PATTERN = [[1, 1], [1, 0], [0, 0], [1, 1], [1, 1], [0, 1], [1, 1], [1, 0], [1, 1], [1, 1], [0, 1], [1, 1]]


def outcomes(chunk: int, pairs: list[int], version: int) -> list[PromptOutcome]:
    out = []
    for p, good in enumerate(pairs):
        sample = TrainSample([chunk, p], [1], [2]) if good else None
        out.append(PromptOutcome(OutcomeStats(prompts=1, bad_samples=1 - good), sample, version=version))
    return out


def simulate(learner_first: bool, every: int, lookahead: int, max_lag=None, checkpoint_after=None):
    """Drive the schedule as the orchestrator does; `learner_first` picks which of two ready events (a step
    done, a chunk released) happens first, standing for a fast or a slow learner."""
    sched = Schedule.start(every, lookahead, base=5, max_lag=max_lag, step_cap=None)
    batcher = GlobalBatcher(2)
    published, trained, submitted = 5, 0, 0
    in_flight: deque = deque()
    chunk_versions, steps = [], []
    while True:
        while submitted < len(PATTERN):
            version = sched.next_version()
            if version is None or version > published:
                break
            in_flight.append((submitted, version))
            chunk_versions.append(version)
            sched.submitted += 1
            submitted += 1
        if sched.queue and (learner_first or not in_flight):
            formed = sched.queue.popleft()
            trained += 1
            assert formed.step == trained
            steps.append((formed.step, formed.version, [o.version for o in formed.batch.outcomes],
                          [tuple(o.sample.prompt_ids) for o in formed.batch.outcomes], formed.dropped))
            version = sched.published_after(trained)
            if version is not None:
                published = version
        elif in_flight:
            chunk, version = in_flight.popleft()
            for o in outcomes(chunk, PATTERN[chunk], version):
                batcher.add(o)
            sched.release(batcher)
            if checkpoint_after == sched.released:  # what a mid-iteration checkpoint keeps, through JSON
                sched = Schedule.from_state(json.loads(json.dumps(sched.state())))
                state = json.loads(json.dumps(batcher.state()))
                batcher = GlobalBatcher(2)
                batcher.restore(state)
        else:
            break
    return chunk_versions, steps, sched


@pytest.mark.parametrize("every,lookahead", [(1, 1), (1, 3), (2, 2), (4, 3)])
def test_the_schedule_does_not_depend_on_timing(every, lookahead):
    fast = simulate(True, every, lookahead)
    slow = simulate(False, every, lookahead)
    assert fast[0] == slow[0] and fast[1] == slow[1]
    versions, steps, _ = fast
    assert versions[:lookahead] == [5] * lookahead and versions == sorted(versions)
    for step, version, _, _, _ in steps:  # the learner's version at a step: one more every `every` steps
        assert version == 5 + (step - 1) // every
    assert max(version - min(v) for _, version, v, _, _ in steps) > 0  # the pools do lag the learner


def test_pairs_older_than_the_bound_are_dropped_and_counted():
    unbounded = simulate(True, 1, 3)[1]
    assert max(version - min(v) for _, version, v, _, _ in unbounded) > 1
    for learner_first in (True, False):
        _, steps, sched = simulate(learner_first, 1, 3, max_lag=1)
        assert all(version - v <= 1 for _, version, vs, _, _ in steps for v in vs)
        assert sched.dropped > 0 and sched.dropped >= sum(s[-1] for s in steps)
    assert simulate(True, 1, 3, max_lag=1)[1] == simulate(False, 1, 3, max_lag=1)[1]


def test_a_checkpointed_schedule_continues_exactly():
    whole = simulate(True, 2, 2, max_lag=1)
    for after in (1, 4, 7):
        resumed = simulate(True, 2, 2, max_lag=1, checkpoint_after=after)
        assert resumed[0] == whole[0] and resumed[1] == whole[1]


def test_dropping_keeps_the_prompts_counts_and_says_why():
    batcher = GlobalBatcher(4, judge_pair_cap=1)
    old = PromptOutcome(OutcomeStats(prompts=1), TrainSample([1], [2], [3]), judge_sample=TrainSample([1], [4], [5]),
                        version=1)
    new = PromptOutcome(OutcomeStats(prompts=1), TrainSample([6], [7], [8]), version=2)
    batcher.add(old)
    batcher.add(new)
    assert batcher.drop_older_than(2) == 2
    assert old.sample is None and old.judge_sample is None and old.reason == STALE
    assert batcher.buffered_pairs == 1 and batcher.drop_older_than(2) == 0
