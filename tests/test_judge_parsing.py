"""Judge score parsing (SPEC section 3.3) and template filling."""

import pytest

from actors.judges.parsing import fill_template, parse_score
from actors.judges.protocol import Judgement


@pytest.mark.parametrize("text,expected", [
    ("Good answer.\nScore: 4", 4.0),
    ("score:3.5", 3.5),
    ("Points: 2 and later Score: 5", 2.0),  # the first match counts
    ("SCORE : 0", 0.0),
    ("Score: 7", None),  # out of range
    ("Score: -1", None),
    ("Score: five", None),
    ("no score here", None),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_custom_regex_and_range():
    assert parse_score("Rating [[8]]", r"\[\[(\d+)\]\]", 1, 10) == 8.0
    assert parse_score("Rating [[11]]", r"\[\[(\d+)\]\]", 1, 10) is None


def test_fill_template_keeps_braces_in_texts_literal():
    out = fill_template("Q: {prompt}\nA: {response}", "what is {response}?", "{prompt} Score: 5")
    assert out == "Q: what is {response}?\nA: {prompt} Score: 5"


def test_judgement_statistics_ignore_invalid_scores():
    j = Judgement([4.0, None, 2.0], ["", "", ""])
    assert j.valid == [4.0, 2.0] and j.mean == 3.0 and j.variance == 1.0
    assert Judgement([None], [""]).mean is None
