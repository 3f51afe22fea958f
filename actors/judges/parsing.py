"""Reading scores and verdicts out of what a judge wrote, and filling judge templates.

Parsing looks only at the text the judge generated, so a response that itself says "Score: 5" cannot
score itself. `match` picks which match of the pattern counts: "first" (the reference's rule) or "last"
(the templates ask for the grade on the last line, and judges mention scores while reasoning).
"""

from __future__ import annotations

import math
import re
from typing import Literal

from .protocol import DEFAULT_META_REGEX, DEFAULT_REWARD_REGEX

_SLOT = re.compile(r"\{(prompt|response|judgement_a|judgement_b)\}")
SCORE_MATCHES = ("first", "last")
ScoreMatch = Literal["first", "last"]


def find(text: str, regex: str, match: ScoreMatch = "first") -> re.Match | None:
    """The first or the last match of `regex` in `text` (None: no match)."""
    if match == "first":
        return re.search(regex, text)
    if match == "last":
        found = None
        for found in re.finditer(regex, text):
            pass
        return found
    raise ValueError(f"match must be one of {SCORE_MATCHES}, got {match!r}")


def parse_score(text: str, regex: str = DEFAULT_REWARD_REGEX, low: float = 0.0, high: float = 5.0,
                match: ScoreMatch = "first") -> float | None:
    """The chosen match of `regex` in `text` as a float (its first group, else the whole match), or None if
    absent, not a number or out of [low, high]. A named group `of` is a scale ("4/5", "4 out of 5"): it must
    equal `high`, or the score is None (a grade on another scale is not rescaled)."""
    found = find(text, regex, match)
    if found is None:
        return None
    try:
        value = float(found.group(1) if found.groups() else found.group(0))
        scale = found.groupdict().get("of")
        if scale is not None and float(scale) != high:
            return None
    except (TypeError, ValueError):  # TypeError: the group took no part in the match
        return None
    if not math.isfinite(value) or not low <= value <= high:
        return None
    return value


def parse_verdict(text: str, regex: str = DEFAULT_META_REGEX, match: ScoreMatch = "first") -> str | None:
    """'A' or 'B' from the chosen match of `regex` in the meta-judge's text; anything else is no verdict."""
    found = find(text, regex, match)
    if found is None:
        return None
    letter = (found.group(1) if found.groups() else found.group(0)) or ""
    letter = letter.strip().upper()
    return letter if letter in ("A", "B") else None


def strip_score(judgement: str, regex: str = DEFAULT_REWARD_REGEX, match: ScoreMatch = "first") -> str:
    """The judgement without the score text `parse_score` reads (the meta-judge must compare reasoning, not
    read off the grade): only that match is cut, the rest of the text stays."""
    found = find(judgement, regex, match)
    if found is None:
        return judgement.rstrip()
    return (judgement[: found.start()] + judgement[found.end() :]).rstrip()


def fill_template(template: str, prompt: str, response: str, **judgements: str) -> str:
    """Substitute the {slots} in one pass (so braces inside the texts stay literal)."""
    values = {"prompt": prompt, "response": response, **judgements}
    return _SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), template)
