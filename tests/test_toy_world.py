"""The toy world: rubric, judgement format, tokenizer/chat template, and engine parity on the toy model."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engines.protocol import GenerationRequest, SamplingParams
from actors.engines.torch_engine import TorchEngine
from actors.judges.parsing import parse_score
from orchestration.toy import task, world


def test_rubric_is_additive_and_checks_each_criterion():
    assert task.rubric_score("85", 85) == 5
    assert task.rubric_score("95", 85) == 3  # first digit wrong, so not exact either
    assert task.rubric_score("86", 85) == 3  # last digit wrong, so not exact either
    assert task.rubric_score("8", 85) == 2  # a number with the right first digit only
    assert task.rubric_score("185", 85) == 2  # wrong length, last digit right, first digit wrong
    assert task.rubric_score("no idea", 85) == 0
    assert task.rubric_score(" 85 ", 85) == 5


def test_column_sum_works_the_carries():
    assert task.column_sum(47, 38) == ["7+8+0=15", "4+3+1=8", "Sum: 85"]
    assert task.column_sum(5, 95) == ["5+5+0=10", "0+9+1=10", "Sum: 100"]


def test_perfect_judgement_parses_to_the_rubric_score():
    rng = random.Random(0)
    for _ in range(200):
        p = task.sample_problem(rng, 99)
        answer = task.candidate_answers(rng, p.answer)
        assert parse_score(task.judgement_text(p, answer)) == task.rubric_score(answer, p.answer)


@pytest.fixture(scope="module")
def toy_m0(tmp_path_factory):
    """The toy tokenizer and an untrained toy model (the bootstrap's starting point)."""
    rng = random.Random(1)
    corpus = []
    for _ in range(300):
        p = task.sample_problem(rng, 99)
        c = task.candidate_answers(rng, p.answer)
        corpus += [p.question + "\n" + str(p.answer), world.judge_prompt(p.question, c) + "\n" + task.judgement_text(p, c)]
    tokenizer = world.build_tokenizer(corpus, vocab_size=300)
    path = tmp_path_factory.mktemp("toy_m0")
    world.save_initial_model(tokenizer, world.ToyRecipe(hidden_size=64, layers=2), path)
    return path


def test_toy_tokenizer_round_trips_and_renders_the_chat_template(toy_m0):
    tok = AutoTokenizer.from_pretrained(toy_m0)
    text = "What is 47 + 385?"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>What is 47 + 385?<|end|><|assistant|>"
    assert tok.convert_ids_to_tokens(tok.encode("<|end|>", add_special_tokens=False)) == ["<|end|>"]
    digits = tok.convert_ids_to_tokens(tok.encode("385", add_special_tokens=False))
    assert len(digits) == 3  # digits are always split


def test_engine_greedy_equals_transformers_on_the_toy_model(toy_m0):
    tok = AutoTokenizer.from_pretrained(toy_m0)
    model = AutoModelForCausalLM.from_pretrained(toy_m0).eval()
    engine = TorchEngine(str(toy_m0), max_batch_size=4)
    questions = ["What is 1 + 2?", "Add 47 and 38.", "Compute 99 + 99.", "12 + 7 = ?", "What is 5 + 60?"]
    prompts = [world._prompt_ids(tok, q) for q in questions]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    results = engine.generate([GenerationRequest(p, greedy) for p in prompts])
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert result.token_ids == out[0, len(prompt):].tolist()


def test_every_flaw_gives_a_judgement_that_differs_from_the_right_one():
    rng = random.Random(3)
    seen = {flaw: 0 for flaw in task.FLAWS}
    for _ in range(300):
        p = task.sample_problem(rng, 49)
        answer = task.candidate_answers(rng, p.answer)
        right = task.judgement_text(p, answer)
        for flaw in task.FLAWS:
            wrong = task.flawed_judgement(rng, p, answer, flaw)
            assert wrong != right
            assert task.without_score(wrong) != task.without_score(right)  # the meta-judge sees no score
            seen[flaw] += parse_score(wrong) != parse_score(right)
    # Most slips change the score (that is what makes them matter), each kind in at least some cases.
    assert all(n > 50 for n in seen.values()), seen


def test_the_meta_judge_grades_the_answer_itself_and_checks_each_judgements_verdicts_against_its_own():
    p = task.Problem(47, 38, 0)
    right = task.without_score(task.judgement_text(p, "84"))
    wrong = task.without_score(task.judgement_text(task.Problem(46, 38, 0), "84"))  # a misread operand: Sum 84
    flipped = task.without_score(task.flawed_judgement(random.Random(0), p, "84", "verdict"))
    assert task.verdicts(right) == "yynyn" and task.verdicts(wrong) == "yyyyy" and task.verdicts("no checks") == "?????"
    assert task.judged_sum(flipped) == "85" and task.verdicts(flipped) != "yynyn"  # right sum, a verdict flipped
    text = task.meta_judgement_text(p, "84", "B", wrong, right)
    assert text.splitlines()[-9:] == ["Sum: 85", "Number: yes", "Digits: 2 vs 2 yes", "Last: 4 vs 5 no",
                                       "First: 8 vs 8 yes", "Exact: 84 vs 85 no", "A: yyyyy vs yynyn no",
                                       "B: yynyn vs yynyn yes", "Winner: Judgement B"]
    for seed in range(200):  # every probe's slip changes the score, and its answer names the right judgement
        prompt, answer = world._meta_example(random.Random(seed), 49)
        a, b = prompt.split("Judgement A:\n")[1].split("\nJudgement B:\n")
        lines = answer.splitlines()
        winner = lines[-1][-1]
        assert task.verdicts(a).count("y") != task.verdicts(b).count("y")
        assert lines[-3 if winner == "A" else -2].endswith(" yes") and lines[-2 if winner == "A" else -3].endswith(" no")


def test_the_answer_phase_stops_at_the_target_and_says_when_it_cannot(tmp_path):
    tiny = dict(train_prompts=8, val_prompts=8, bootstrap_answers=32, bootstrap_judgements=32, meta_judgements=8,
                bootstrap_steps=2, bootstrap_batch=8, answer_steps=2 * world.ANSWER_CHECK_EVERY + 3,
                hidden_size=32, layers=1, heads=2, kv_heads=1)
    at_once = world.prepare(world.ToyRecipe(answer_target=0.0, **tiny), tmp_path, log=lambda *_: None).report
    assert at_once["answer_phase_steps"] == world.ANSWER_CHECK_EVERY and at_once["dev_answer_accuracy"] >= 0.0
    lines = []
    never = world.prepare(world.ToyRecipe(answer_target=1.01, **tiny), tmp_path, log=lines.append).report
    assert never["answer_phase_steps"] == tiny["answer_steps"] and never["dev_answer_accuracy"] is None
    assert any("WARNING" in line and "without reaching 101%" in line for line in lines)
    assert "meta_judge_accuracy" in never  # a world with meta-judge examples reports its meta-judge


def test_a_stop_during_the_bootstrap_leaves_nothing_in_the_cache(tmp_path):
    from orchestration.stopping import StopRequested

    asked = []
    recipe = world.ToyRecipe(train_prompts=8, val_prompts=8, bootstrap_answers=16, bootstrap_judgements=16,
                             bootstrap_steps=50, bootstrap_batch=4, hidden_size=32, layers=1, heads=2, kv_heads=1)

    def stop():
        asked.append(1)
        return "SIGTERM received" if len(asked) > 3 else None

    with pytest.raises(StopRequested, match="SIGTERM received during the toy bootstrap"):
        world.prepare(recipe, tmp_path, log=lambda *_: None, stop=stop)
    assert len(asked) == 4 and list((tmp_path / "toy").iterdir()) == []


def test_a_slip_in_a_column_carries_into_the_sum():
    rng = random.Random(0)
    for _ in range(50):
        work, believed = task._column_sum_with_slip(47, 38, rng)
        assert work[-1] == f"Sum: {believed}" and believed != "85"
        assert work[:-1] != task.column_sum(47, 38)[:-1]


def test_the_recipe_hash_names_the_library_versions(monkeypatch):
    recipe = world.ToyRecipe()
    before = recipe.digest()
    monkeypatch.setattr(world, "library_versions", lambda: {"torch": "0.0", "transformers": "0", "tokenizers": "0"})
    assert recipe.digest() != before
    assert world.ToyRecipe(seed=2).digest() != world.ToyRecipe(seed=3).digest()


_BUILD = """
import hashlib, sys
from orchestration.toy import world
recipe = world.ToyRecipe(seed=5, train_prompts=16, val_prompts=16, bootstrap_answers=64, bootstrap_judgements=128,
                         bootstrap_steps=12, bootstrap_batch=16, hidden_size=64, layers=2, meta_judgements=64,
                         answer_steps=12, answer_target=0.5)
toy = world.prepare(recipe, sys.argv[1], log=lambda *_: None)
print(hashlib.sha256((toy.model_dir / "model.safetensors").read_bytes()).hexdigest())
print(hashlib.sha256((toy.model_dir / "tokenizer.json").read_bytes()).hexdigest())
"""


def test_two_builds_in_separate_processes_give_the_same_m1_bit_for_bit(tmp_path):
    import subprocess
    import sys

    digests = []
    for name in ("a", "b"):
        out = subprocess.run([sys.executable, "-c", _BUILD, str(tmp_path / name)], capture_output=True, text=True,
                             timeout=600, check=True)
        digests.append(out.stdout.split())
    assert len(digests[0]) == 2 and digests[0] == digests[1]
