"""Verifier-scored and judge-scored samples in one run (SPEC 4b): the routing in the rollout, the meta-judge
leaving verifier rewards alone (SPEC 4.1), and toy Self-Rewarding runs whose metrics show both sources."""

import json
import random
import re

import pytest
import ray

from actors.engines.protocol import GenerationResult
from actors.generator import GenerationBatch
from actors.judges.protocol import FIXED, JudgeBatch, Judgement, MetaBatch
from actors.judges.verifier import VerifierJudge
from conftest import TOY_TEST_OVERRIDES
from orchestration import load_config, run
from orchestration.config import ConfigError
from orchestration.rollout import PromptRecord, RolloutPipeline
from orchestration.toy import task

RESPONSES = ["4", "5", "4", "7"]  # what the fake generator answers, per prompt, in sample order


class Tokens:
    """Characters as token ids."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class FakePool(list):
    """An EnginePool stand-in: one replica that serves `impl`'s methods through the object store."""

    def __init__(self, impl, follows_policy=True):
        super().__init__([impl])
        self.impl, self.follows_policy = impl, follows_policy

    def call(self, replica, method, *args):
        return ray.put(getattr(self.impl, method)(*args))


class FakeGenerator:
    def generate(self, requests):
        return GenerationBatch([GenerationResult([ord(c) for c in RESPONSES[i % 4]], "stop", 0)
                                for i in range(len(requests))])


class FakeJudge:
    """An LLM judge that disagrees with itself (scores 1 and 4), so every response is a meta-judge candidate."""

    def __init__(self):
        self.judged, self.compared = [], []

    def judge(self, items):
        self.judged.extend(items)
        return JudgeBatch([Judgement([1.0, 4.0], ["bad. Score: 1", "good. Score: 4"], 0) for _ in items], 0)

    def meta_judge(self, items):
        self.compared.extend(items)
        return MetaBatch(["A"] * len(items), ["Winner: Judgement A"] * len(items))


class SelfDoubtingVerifier(VerifierJudge):
    """A verifier whose k scores differ: the meta-judge must still leave its responses alone."""

    def judge(self, items):
        return JudgeBatch([Judgement([0.0, 5.0], ["no", "yes"], FIXED, verifier="toy") for _ in items], 0)


def records():
    toy = {"task": "add", "operands": [2, 2], "answer": 4}
    return iter([PromptRecord(0, 0, [1], "What is 2 + 2?", "What is 2 + 2?", {**toy, "verifier": "toy"}),
                 PromptRecord(1, 0, [1], "Add 2 and 2.", "Add 2 and 2.", toy),
                 PromptRecord(2, 0, [1], "2 + 2 = ?", "2 + 2 = ?",
                              {"verifier": "math", "verifier_args": {"answer": "4"}})])


def drain(pipeline):
    while pipeline.submit_next():
        pass
    out = []
    for _ in range(100):  # every call answers at once: a few rounds finish the stages
        pipeline.advance(set(pipeline.pending()))
        out += pipeline.pop_ready()
        if not pipeline.pending():
            return out
    raise AssertionError("the pipeline did not finish")


def pipeline(judge, verifiers, chunk=8, meta=False):
    return RolloutPipeline(FakePool(FakeGenerator()), FakePool(judge), records(), tokenizer=Tokens, sampling=None,
                           num_responses=4, num_evals=2, chunk_size=chunk, seed=1, iteration=0, meta_judge=meta,
                           score_regex=r"Score: \d", local_verifiers=verifiers)


def test_verifier_named_samples_never_reach_the_judge_and_the_rest_do(ray_session):
    judge = FakeJudge()
    toy, llm, math = drain(pipeline(judge, VerifierJudge(0.0, 5.0)))
    assert [i.response for i in judge.judged] == RESPONSES and all(i.verifier is None for i in judge.judged)
    assert [j.scores for j in toy.judgements] == [[5.0, 5.0], [0.0, 0.0], [5.0, 5.0], [0.0, 0.0]]
    assert {j.verifier for j in toy.judgements} == {"toy"} and {j.verifier for j in math.judgements} == {"math"}
    assert [j.scores for j in math.judgements] == [j.scores for j in toy.judgements]
    assert all(j.verifier is None and j.scores == [1.0, 4.0] for j in llm.judgements)


def test_a_chunk_of_verifier_samples_alone_skips_the_judge_pool(ray_session):
    judge = FakeJudge()
    [toy] = drain(pipeline(judge, VerifierJudge(0.0, 5.0), chunk=1))[:1]
    assert toy.record.index == 0 and len(judge.judged) == 4  # only prompt 1's four responses were sent


def test_the_meta_judge_skips_responses_with_verifier_rewards(ray_session):
    judge = FakeJudge()
    toy, llm, math = drain(pipeline(judge, SelfDoubtingVerifier(0.0, 5.0), meta=True))
    assert toy.meta is None and math.meta is None  # their k scores differ, but they are rules' scores
    assert llm.meta is not None and {i.prompt for i in judge.compared} == {"Add 2 and 2."}


def test_default_verifier_belongs_to_the_verifier_backend():
    with pytest.raises(ConfigError, match=r"judge.default_verifier='toy' applies to judge.backend=verifier only"):
        load_config(["judge.default_verifier=toy"])
    with pytest.raises(ConfigError, match=r"judge.default_verifier='oracle' is not one of: math, ifeval, toy"):
        load_config(["judge.backend=verifier", "judge.default_verifier=oracle"])
    with pytest.raises(ConfigError, match=r"judge.backend=verifier cannot meta-judge"):
        load_config(["judge.backend=verifier", "algorithm=meta_rewarding"])
    assert load_config(["judge.backend=verifier", "judge.default_verifier=toy"]).judge.default_verifier == "toy"


# ---- toy runs ------------------------------------------------------------------------------------------------


def mixed_data(path, n=48):
    """Toy questions: a third name the toy verifier, a third the math verifier, a third no verifier (the judge)."""
    rng = random.Random(7)
    with open(path, "w") as f:
        for i in range(n):
            p = task.sample_problem(rng, 49)
            row = {"messages": [{"role": "user", "content": p.question},
                                {"role": "assistant", "content": str(p.answer)}], **p.metadata()}
            if i % 3 == 0:
                row["verifier"] = "toy"
            elif i % 3 == 1:
                row.update(verifier="math", verifier_args={"answer": str(p.answer)})
            f.write(json.dumps(row) + "\n")
    return path


def toy_run(tmp_path, toy_cache, *overrides):
    cfg = load_config([
        f"output_dir={tmp_path / 'run'}", f"model.toy.cache_dir={toy_cache}", "logger.wandb.mode=disabled",
        *TOY_TEST_OVERRIDES, "algorithm.global_batch_size=4", "algorithm.micro_batch_size=2",
        "algorithm.rollout_batch_size=16", "algorithm.max_iterations=1",
        f"data.train_file={mixed_data(tmp_path / 'mixed.jsonl')}", *overrides])
    result = run(cfg)
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    table = [json.loads(line) for line in (tmp_path / "run" / "table_judgements.jsonl").read_text().splitlines()]
    return result, rows, table


def summed(rows, key):
    return sum(r.get(f"train/{key}", 0) for r in rows)


def sum_of(question: str) -> int:
    a, b = map(int, re.findall(r"\d+", question))
    return a + b


@pytest.mark.slow
def test_a_toy_run_mixes_verifier_and_judge_scores_and_its_metrics_show_both(ray_session, toy_cache, tmp_path):
    result, rows, table = toy_run(tmp_path, toy_cache)
    [it, _final] = result.iterations
    assert it["steps"] >= 1
    responses = {s: summed(rows, f"scored_by/{s}/responses") for s in ("judge", "toy", "math")}
    assert all(n > 0 for n in responses.values()), responses
    assert 0 < it["verified_share"] < 1 and it["judge_parse_rate"] is not None
    steps = [r for r in rows if "train/scored_by/toy/responses" in r]
    assert steps and all(0 <= r["train/scored_by/toy/score_mean"] <= 5 for r in steps)
    kinds = {row["kind"] for row in table}
    assert {"judge", "verifier"} <= kinds
    for row in table:  # a verifier's score is the rule's: the sum, exactly, or nothing
        if row["kind"] == "verifier":
            assert row["parsed"] == (5.0 if row["response"].strip() == str(sum_of(row["prompt"])) else 0.0)


@pytest.mark.slow
def test_the_verifier_backend_scores_every_sample_in_its_own_pool(ray_session, toy_cache, tmp_path):
    result, rows, table = toy_run(tmp_path, toy_cache, "judge.backend=verifier", "judge.default_verifier=toy")
    [it, _final] = result.iterations
    assert it["verified_share"] == 1.0 and it["judge_parse_rate"] is None and it["heldout_judge_accuracy"] is None
    assert summed(rows, "scored_by/judge/responses") == 0 and summed(rows, "scored_by/none/responses") == 0
    assert summed(rows, "scored_by/toy/responses") > summed(rows, "scored_by/math/responses") > 0
    assert {row["kind"] for row in table} == {"verifier"}
