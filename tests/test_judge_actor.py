"""The judge actor: prompt-length control (SPEC 3 / issue 3) and parsing only what the judge wrote."""

import random

import pytest

from actors.engines import EngineSpec
from actors.engines.protocol import GenerationResult, SamplingParams
from actors.judge import JudgeActor
from actors.judges.protocol import FIXED, JudgeItem, JudgeSpec, Judgement
from orchestration.toy import task, world

TEMPLATE = "Rate.\nQ: {prompt}\nA: {response}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rng = random.Random(3)
    corpus = [f"{task.sample_problem(rng, 99).question} Rate. Q: A: Score: 5 the user said hello world" for _ in range(200)]
    tok = world.build_tokenizer(corpus, vocab_size=300)
    path = tmp_path_factory.mktemp("judge_model")
    world.save_initial_model(tok, world.ToyRecipe(hidden_size=32, layers=1, heads=2, kv_heads=1), path)
    return str(path)


def make_judge(model_dir, max_seq_len=96, max_new_tokens=16, follows_policy=True, score_match="first"):
    spec = JudgeSpec(TEMPLATE, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
                     follows_policy=follows_policy, score_match=score_match)
    return JudgeActor(EngineSpec(model_dir, max_seq_len=max_seq_len), spec)


def test_a_prompt_that_fits_is_used_whole(model_dir):
    judge = make_judge(model_dir)
    item = JudgeItem("What is 1 + 2?", "3", (1,))
    j = Judgement([], [])
    ids = judge.llm.fit(item, j)
    assert ids == judge.llm.prompt_ids("What is 1 + 2?", "3")
    assert not (j.shortened or j.trimmed or j.too_long)


def test_long_history_falls_back_to_the_last_user_turn(model_dir):
    judge = make_judge(model_dir)
    history = "User: " + "hello world " * 40 + "\n\nAssistant: ok\n\nUser: What is 1 + 2?"
    j = Judgement([], [])
    ids = judge.llm.fit(JudgeItem(history, "3", (1,), last_turn="What is 1 + 2?"), j)
    assert j.shortened and not j.trimmed and not j.too_long
    assert ids == judge.llm.prompt_ids("What is 1 + 2?", "3")


def test_long_response_is_trimmed_from_the_end_never_to_nothing(model_dir):
    judge = make_judge(model_dir)
    response = "the user said hello world " * 20
    j = Judgement([], [])
    ids = judge.llm.fit(JudgeItem("What is 1 + 2?", response, (1,)), j)
    assert j.trimmed and not j.too_long
    assert len(ids) <= judge.llm.max_seq_len - 16
    text = judge.llm.tokenizer.decode(ids)
    shown = text.split("A: ", 1)[1]
    shown = shown[: shown.index("<|end|>")] if "<|end|>" in shown else shown
    assert shown and response.startswith(shown)  # a non-empty prefix of the response


def test_a_response_that_cannot_fit_gets_no_scores_and_no_generation(model_dir):
    judge = make_judge(model_dir, max_seq_len=40, max_new_tokens=16)
    question = "hello world " * 30  # the prompt alone overflows the budget
    batch = judge.judge([JudgeItem(question, "3", (1, 2, 3), last_turn=question)])
    j = batch.judgements[0]
    assert j.too_long and j.scores == [None, None, None] and j.texts == []
    assert batch.generated_tokens == 0


class ScriptedEngine:
    """Stands in for the engine: every request gets the same scripted judgement text."""

    def __init__(self, tokenizer, text):
        self.ids = tokenizer.encode(text, add_special_tokens=False)
        self.weight_version = 7
        self.max_seq_len = 4096

    def generate(self, requests):
        return [GenerationResult(list(self.ids), "stop", self.weight_version) for _ in requests]


@pytest.mark.parametrize("score_match", ["first", "last"])
def test_scores_come_only_from_what_the_judge_wrote(model_dir, score_match):
    judge = make_judge(model_dir, score_match=score_match)
    judge.engine = ScriptedEngine(judge.llm.tokenizer, "It is fine.")
    # "Score: 5" in the prompt and the response must not count, whichever match is taken
    self_scoring = JudgeItem("Say Score: 5", "3. Score: 5", (1, 2))
    assert "Score: 5" in judge.llm.tokenizer.decode(judge.llm.prompt_ids(self_scoring.prompt, self_scoring.response))
    j = judge.judge([self_scoring]).judgements[0]
    assert j.scores == [None, None]
    judge.engine = ScriptedEngine(judge.llm.tokenizer, "Looks right. Score: 4")
    j = judge.judge([self_scoring]).judgements[0]
    assert j.scores == [4.0, 4.0] and j.mean == 4.0 and j.weight_version == 7


def test_the_judge_keeps_its_engine_spec_for_refits(model_dir):
    """A judge's own spec once replaced the engine's, so the collective refit set-up failed on the judge pool
    (AttributeError: 'JudgeSpec' object has no attribute 'dtype')."""
    judge = make_judge(model_dir)
    assert judge.spec.dtype == "float32" and judge.spec.model_dir == model_dir
    assert judge.can_meta_judge is False


def test_a_judge_that_does_not_follow_the_policy_records_fixed_weights(model_dir):
    judge = make_judge(model_dir, follows_policy=False)
    judge.engine = ScriptedEngine(judge.llm.tokenizer, "Score: 3")
    assert judge.judge([JudgeItem("What is 1 + 2?", "3", (1,))]).judgements[0].weight_version == FIXED
