"""Meta-Rewarding pieces: verdict parsing, outcome rules, Bradley-Terry/Elo, judge-pair drop rules, balance."""

import numpy as np
import pytest

from actors.judges.parsing import parse_verdict
from orchestration import meta


@pytest.mark.parametrize("text,expected", [
    ("Judgement A is more accurate.\nWinner: Judgement A", "A"),
    ("winner: judgment b", "B"),  # the other spelling, lower case
    ("Winner:Judgement B.", "B"),
    ("Winner: Judgement C", None),
    ("Winner: both", None),
    ("I prefer A", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_strip_score_removes_only_the_grade():
    regex = r"(?i)(?:score|points)\s*:\s*([-+]?\d+(?:\.\d+)?)"
    assert meta.strip_score("Good reasoning.\nScore: 4", regex) == "Good reasoning."


def test_choose_candidate_needs_two_valid_scores_and_variance():
    assert meta.choose_candidate([[5, 5, 5], [1, None, 4], [2, 3, None], [None, None, 5]]) == 1
    assert meta.choose_candidate([[5, 5], [None, 3]]) is None


def test_comparisons_cover_both_orders():
    assert meta.comparisons(3) == [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]


def test_win_counts_rules():
    verdicts = {
        (0, 1): "A", (1, 0): "B",  # 0 beats 1 in both orders
        (0, 2): "A", (2, 0): "A",  # split: position bias -> tie credits both
        (1, 2): "B", (2, 1): None,  # one order unparsed -> nothing
    }
    w = meta.win_counts(3, verdicts)
    assert w.tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]


def mm_reference(wins, iterations=20000):
    """Hunter's MM algorithm for the Bradley-Terry MLE: an independent route to the same strengths."""
    n = wins.shape[0]
    p = np.ones(n)
    games = wins + wins.T
    for _ in range(iterations):
        denom = np.array([sum(games[i, j] / (p[i] + p[j]) for j in range(n) if j != i) for i in range(n)])
        p = wins.sum(1) / denom
        p /= p.sum()
    theta = np.log(p)
    return theta - theta.mean()


@pytest.mark.parametrize("seed", range(5))
def test_bradley_terry_matches_a_reference_fit_on_random_win_matrices(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 7))
    wins = rng.integers(1, 6, size=(n, n)).astype(float)  # every pair played both ways: a finite MLE exists
    np.fill_diagonal(wins, 0)
    ours = meta.bradley_terry(wins)
    assert ours == pytest.approx(mm_reference(wins), abs=1e-6)
    assert meta.elo(wins) == pytest.approx(400 * ours + 1000)


def test_bradley_terry_orders_a_clean_sweep():
    wins = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=float)  # 0 > 1 > 2, no finite optimum
    ratings = meta.elo(wins)
    assert ratings[0] > ratings[1] > ratings[2] and np.isfinite(ratings).all()


def test_judge_pair_and_drop_rules():
    sweep = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=float)
    texts = ["a", "b", "c"]
    assert meta.choose_judge_pair(texts, [4.0, 3.0, 1.0], sweep) == meta.JudgePairChoice(0, 2)
    assert "no score" in meta.choose_judge_pair(texts, [4.0, 3.0, None], sweep).reason
    assert "equal scores" in meta.choose_judge_pair(texts, [2.0, 3.0, 2.0], sweep).reason
    assert "identical" in meta.choose_judge_pair(["x", "b", "x"], [4.0, 3.0, 1.0], sweep).reason
    all_ties = np.ones((3, 3)) - np.eye(3)
    assert "not all distinct" in meta.choose_judge_pair(texts, [4.0, 3.0, 1.0], all_ties).reason


def test_score_class_balance():
    balance = meta.ScoreClassBalance(max_share=0.4)
    decisions = [balance.admit(s) for s in [5, 5, 4, 5, 3, 4, 5, 2]]
    # A pair is refused when its class already holds >= 40% of the admitted pairs: the second 5 (1 of 1)
    # and the third (1 of 2); the later 4 (1 of 3) and 5 (1 of 4) are below the share and admitted.
    assert decisions == [True, False, True, False, True, True, True, True]
    assert balance.counts == {5: 2, 4: 2, 3: 1, 2: 1}


class _CharTokenizer:
    """Characters as token ids: enough of a tokenizer for LLMJudge's prompt building and decoding."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, chat_template):
        return messages[0]["content"]

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


@pytest.mark.parametrize("meta_temperature,expected", [(None, 0.7), (0.0, 0.0), (0.3, 0.3)])
def test_the_meta_judge_samples_at_its_own_temperature_and_length(meta_temperature, expected):
    from actors.engines.protocol import GenerationResult, SamplingParams
    from actors.judges.llm import LLMJudge
    from actors.judges.protocol import JudgeSpec, MetaItem

    seen = []

    def generate(requests):
        seen.extend(requests)
        return [GenerationResult([ord(c) for c in "Winner: Judgement B"], "stop", 0) for _ in requests]

    spec = JudgeSpec(template="{prompt} {response}", sampling=SamplingParams(temperature=0.7, max_new_tokens=96),
                     meta_template="{prompt}|{response}|{judgement_a}|{judgement_b}", meta_max_new_tokens=40,
                     meta_temperature=meta_temperature)
    out = LLMJudge(spec, _CharTokenizer(), 1000, generate).meta_judge([MetaItem("q", "r", "a", "b", seed=3)])
    assert out.verdicts == ["B"]
    assert [(r.sampling.temperature, r.sampling.max_new_tokens) for r in seen] == [(expected, 40)]
    assert spec.sampling.temperature == 0.7  # the judge's own sampling is left as it was
