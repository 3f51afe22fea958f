"""Judge score and verdict parsing (SPEC sections 3.3 and 4.2), judge.score_match, and template filling."""

import re

import pytest
import yaml

from actors.judges.parsing import fill_template, parse_score, parse_verdict, strip_score
from actors.judges.protocol import DEFAULT_META_REGEX, DEFAULT_REWARD_REGEX, Judgement
from orchestration.config import ConfigError, config_dir, load_config

REFERENCE_REGEX = r"(?i)(?:score|points)\s*:\s*([-+]?\d+(?:\.\d+)?)"  # the reference's pattern


@pytest.mark.parametrize("text,expected", [
    ("Good answer.\nScore: 4", 4.0),
    ("score:3.5", 3.5),
    ("SCORE : 0", 0.0),
    ("Points: 2", 2.0),
    ("Final score: 3", 3.0),
    # What real judges write around the required line:
    ("**Score:** 4", 4.0),
    ("Score: **4**", 4.0),
    ("**Score: 4**", 4.0),
    ("__Score__: 3", 3.0),
    ("### Score: 2", 2.0),
    ("Score: .5", 0.5),
    ("Score: 4.5", 4.5),
    ("Score: 4.", 4.0),  # the sentence's full stop
    ("Score: [3]", 3.0),
    ("Score: (3)", 3.0),
    ("Score: <2>", 2.0),  # the template's "<points>" filled in
    ('Score: "4"', 4.0),
    ("Score:\n4", 4.0),
    ("Score: 2 points", 2.0),
    ("Score: 4/5", 4.0),  # the judge's scale, written out
    ("Score: 4 / 5", 4.0),
    ("Score: 4 out of 5", 4.0),
    ("Score: 5\n-3 for style, said nobody", 5.0),  # a minus on the next line is no range
])
def test_accepted_forms(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize("text", [
    "Score: 7",  # out of range
    "Score: -1",
    "Score: 5.5",
    "Score: five",
    "Score: <points>",  # the template's placeholder copied
    "no score here",
    "Score: 8/10",  # another scale: not rescaled
    "Score: 2/3",
    "Score: 3-4",  # a range is no score
    "Score: 3 - 4",
    "Score: 3\u20134",
    "Viewpoints: 3",  # "points" inside a word
    "Scoreboard: 3",
    "Scores: 4",
    "a score of 4",  # prose, no label
    "Score 4",
])
def test_rejected_forms(text):
    assert parse_score(text) is None


def test_the_reference_pattern_reads_fewer_forms():
    forms = ["**Score:** 4", "Score: **4**", "Score: .5", "Score: [3]", "Score: 4/5"]
    assert [parse_score(t) for t in forms] == [4.0, 4.0, 0.5, 3.0, 4.0]
    assert [parse_score(t, REFERENCE_REGEX) for t in forms] == [None, None, None, None, 4.0]
    assert parse_score("Score: 8/10", REFERENCE_REGEX) is None  # 8, out of range, by luck


def test_first_or_last_match():
    text = "A response with Score: 5 would need real expertise; this one has none.\nScore: 3"
    assert parse_score(text, match="first") == 5.0
    assert parse_score(text, match="last") == 3.0
    assert parse_score("Score: 3\nScore: 9", match="last") is None  # the chosen match decides: no fallback
    assert parse_score("Score: 3\nScore: 9", match="first") == 3.0
    assert parse_score("no score", match="last") is None
    with pytest.raises(ValueError, match="match must be one of"):
        parse_score("Score: 3", match="middle")


def test_custom_regex_and_range():
    assert parse_score("Rating [[8]]", r"\[\[(\d+)\]\]", 1, 10) == 8.0
    assert parse_score("Rating [[11]]", r"\[\[(\d+)\]\]", 1, 10) is None
    assert parse_score("8", r"\d+", 0, 10) == 8.0  # no group: the whole match
    # a named group `of` is the scale: it must be score_high
    of = r"(\d+)/(?P<of>\d+)"
    assert parse_score("7/10", of, 0, 10) == 7.0 and parse_score("3/5", of, 0, 10) is None


@pytest.mark.parametrize("text,expected", [
    ("Winner: Judgement A", "A"),
    ("Winner: [Judgement A]", "A"),
    ("**Winner:** Judgement B", "B"),
    ("Winner: **Judgement B**", "B"),
    ("Winner: Judgment A.", "A"),
    ("Winner: A", "A"),  # a bare letter that ends its line
    ("Winner: **B**.", "B"),
    ("Winner: [[B]]", "B"),
    ("Winner: A\nThat is all.", "A"),
    ("Winner: A judgement that reads the rubric", None),  # "A" as an article
    ("Winner: Judgement AB", None),
    ("Winner: Judgement C", None),
    ("Winner: both", None),
])
def test_verdict_forms(text, expected):
    assert parse_verdict(text) == expected


def test_verdict_first_or_last():
    text = "Winner: Judgement A would be the answer if it read the sum right. It did not.\nWinner: Judgement B"
    assert parse_verdict(text, match="first") == "A" and parse_verdict(text, match="last") == "B"


def test_strip_score_cuts_the_match_that_was_read():
    text = "A Score: 5 answer would need more.\nScore: 3"
    assert strip_score(text, match="last") == "A Score: 5 answer would need more."
    assert strip_score(text, match="first") == "A  answer would need more.\nScore: 3"
    assert strip_score("Fine.\n**Score:** **4**/5", match="last") == "Fine."  # with its emphasis
    assert strip_score("no grade  ") == "no grade"


def test_the_configured_defaults_are_the_contracts():
    raw = yaml.safe_load((config_dir() / "config.yaml").read_text())["judge"]
    assert raw["reward_regex"] == DEFAULT_REWARD_REGEX and raw["meta_reward_regex"] == DEFAULT_META_REGEX
    cfg = load_config([])
    assert cfg.judge.reward_regex == DEFAULT_REWARD_REGEX and cfg.judge.score_match == "first"
    re.compile(DEFAULT_REWARD_REGEX) and re.compile(DEFAULT_META_REGEX)


@pytest.mark.parametrize("override,message", [
    ("judge.score_match=middle", r"judge.score_match='middle' is not one of: first, last"),
    ("judge.reward_regex='Score: ('", r"judge.reward_regex='Score: \(' is not a regular expression"),
    ("judge.meta_reward_regex='[AB'", r"judge.meta_reward_regex='\[AB' is not a regular expression"),
])
def test_bad_patterns_and_match_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([override])


def test_fill_template_keeps_braces_in_texts_literal():
    out = fill_template("Q: {prompt}\nA: {response}", "what is {response}?", "{prompt} Score: 5")
    assert out == "Q: what is {response}?\nA: {prompt} Score: 5"


def test_judgement_statistics_ignore_invalid_scores():
    j = Judgement([4.0, None, 2.0], ["", "", ""])
    assert j.valid == [4.0, 2.0] and j.mean == 3.0 and j.variance == 1.0
    assert Judgement([None], [""]).mean is None
