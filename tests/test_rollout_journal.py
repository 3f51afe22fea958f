"""The rollout journal (checkpoint.record_rollouts): the pools' results are recorded before they are used, and a
pipeline of the same configuration that issues the same calls later (a resumed run) takes the recorded
results instead of asking the pools, which matters for an engine whose samples change with the batch
(TensorRT-LLM). The end-to-end resume with the journal on is in test_resume.py."""

import itertools

import ray

from actors.engines.protocol import GenerationResult
from actors.generator import GenerationBatch
from actors.judges.protocol import JudgeBatch, Judgement, MetaBatch
from orchestration.config import ConfigError
from orchestration import load_config
from orchestration.rollout import PromptRecord, RolloutPipeline
from orchestration.rollout_journal import JOURNAL_DIR, RolloutJournal, rollout_fingerprint

import pytest


class Tokens:
    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class CountingPool(list):
    """One replica serving `impl`'s methods through the object store, counting the calls it gets."""

    def __init__(self, impl):
        super().__init__([impl])
        self.impl, self.follows_policy, self.calls = impl, True, 0

    def call(self, replica, method, *args):
        self.calls += 1
        return ray.put(getattr(self.impl, method)(*args))


class UnseededGenerator:
    """Answers that change from call to call and from run to run whatever the seeds (an engine that is not
    batch-invariant): `start` stands for what else was in its batches."""

    def __init__(self, start=0):
        self.counter = itertools.count(start)

    def generate(self, requests):
        return GenerationBatch([GenerationResult([ord("0") + next(self.counter) % 10], "stop", 0) for _ in requests])


class UnseededJudge:
    def __init__(self, start=0):
        self.counter = itertools.count(start)

    def judge(self, items):
        out = []
        for _ in items:
            a, b = next(self.counter) % 6, next(self.counter) % 6
            out.append(Judgement([float(a), float(b)], [f"Score: {a}", f"Score: {b}"], 0))
        return JudgeBatch(out, 3 * len(items))

    def meta_judge(self, items):
        return MetaBatch([("A", "B")[next(self.counter) % 2] for _ in items], ["Winner: A"] * len(items), 2)


def records(n=12):
    return iter([PromptRecord(i, 0, [1], f"q{i}", f"q{i}", {}) for i in range(n)])


def make(journal, start=0):
    generators, judges = CountingPool(UnseededGenerator(start)), CountingPool(UnseededJudge(start))
    pipeline = RolloutPipeline(generators, judges, records(), tokenizer=Tokens, sampling=None, num_responses=3,
                               num_evals=2, chunk_size=4, seed=1, iteration=0, meta_judge=True,
                               score_regex=r"Score: \d")
    pipeline.journal = journal
    return pipeline, generators, judges


def drain(pipeline, chunks=None):
    """Submit `chunks` chunks (all: None) and run them to the end; the scored prompts and the token counts."""
    for _ in itertools.count() if chunks is None else range(chunks):
        if not pipeline.submit_next():
            break
    out = []
    for _ in range(100):
        pipeline.advance(set(pipeline.pending()))
        out += pipeline.pop_ready()
        if not pipeline.pending():
            return [(s.record.index, s.texts, [j.scores for j in s.judgements],
                     s.meta.verdicts if s.meta else None) for s in out], pipeline.counters.take()
    raise AssertionError("the pipeline did not finish")


def test_a_later_pipeline_replays_the_recorded_calls_and_asks_the_pools_only_for_the_rest(ray_session, tmp_path):
    first, gen1, judge1 = make(RolloutJournal(tmp_path, "cfg-1"))
    recorded, tokens = drain(first, chunks=2)  # the stopped run got 2 of 3 chunks through
    assert gen1.calls == 2 and judge1.calls >= 2

    journal = RolloutJournal(tmp_path, "cfg-1")  # the resumed run: same configuration
    again, gen2, judge2 = make(journal, start=5)
    replayed, replayed_tokens = drain(again)
    assert replayed[:len(recorded)] == recorded  # the stopped run's samples, judgements and verdicts
    assert (tokens[0], replayed_tokens[0]) == (2 * 4 * 3, 3 * 4 * 3)  # replayed tokens count as generated
    assert gen2.calls == 1  # only the third chunk reached the generator
    assert journal.replayed == gen1.calls + judge1.calls
    # without the journal the unseeded pools answer differently: the replay is what kept them equal
    fresh, _, _ = make(None, start=5)
    assert drain(fresh, chunks=2)[0] != recorded


def test_a_journal_of_another_configuration_is_discarded(ray_session, tmp_path):
    drain(make(RolloutJournal(tmp_path, "cfg-1"))[0], chunks=1)
    assert list((tmp_path / JOURNAL_DIR).glob("iter_0/*.pkl"))
    said = []
    journal = RolloutJournal(tmp_path, "cfg-2", log=said.append)
    assert "from another configuration are discarded" in said[0]
    pipeline, generators, _ = make(journal)
    drain(pipeline, chunks=1)
    assert generators.calls == 1 and journal.replayed == 0


def test_a_cut_write_is_never_an_entry_and_an_ended_iteration_is_dropped(ray_session, tmp_path):
    journal = RolloutJournal(tmp_path, "cfg-1")
    drain(make(journal)[0], chunks=1)
    entries = sorted((tmp_path / JOURNAL_DIR / "iter_0").glob("*.pkl"))
    entries[0].rename(entries[0].with_name(entries[0].name + ".tmp"))  # as a kill during its write leaves it
    journal = RolloutJournal(tmp_path, "cfg-1")
    assert not list((tmp_path / JOURNAL_DIR).glob("iter_0/*.tmp"))
    pipeline, generators, judges = make(journal)
    drain(pipeline, chunks=1)
    assert generators.calls + judges.calls == 1  # the cut entry's call went to its pool again
    journal.discard(0)
    assert not (tmp_path / JOURNAL_DIR / "iter_0").exists()


def test_the_fingerprint_follows_what_decides_the_rollouts():
    base = rollout_fingerprint(load_config([]))
    assert rollout_fingerprint(load_config(["logger.wandb.mode=disabled", "cluster.generators.replicas=2"])) == base
    assert rollout_fingerprint(load_config(["seed=7"])) != base
    assert rollout_fingerprint(load_config(["judge.sampling.temperature=0.2"])) != base


def test_record_rollouts_takes_auto_true_or_false():
    for value in ("auto", "true", "false"):
        load_config([f"checkpoint.record_rollouts={value}"])
    with pytest.raises(ConfigError, match="checkpoint.record_rollouts must be auto, true or false, got 'sometimes'"):
        load_config(["checkpoint.record_rollouts=sometimes"])
