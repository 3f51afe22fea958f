"""Reading scores and verdicts out of what a judge wrote, and filling judge templates.

Parsing looks only at the text the judge generated, so a response that itself says "Score: 5" cannot
score itself.
"""

from __future__ import annotations

import math
import re

from .protocol import DEFAULT_META_REGEX, DEFAULT_REWARD_REGEX

_SLOT = re.compile(r"\{(prompt|response|judgement_a|judgement_b)\}")


def parse_score(text: str, regex: str = DEFAULT_REWARD_REGEX, low: float = 0.0, high: float = 5.0) -> float | None:
    """The first match of `regex` in `text` as a float, or None if absent, not a number or out of range."""
    match = re.search(regex, text)
    if match is None:
        return None
    try:
        value = float(match.group(1) if match.groups() else match.group(0))
    except ValueError:
        return None
    if not math.isfinite(value) or not low <= value <= high:
        return None
    return value


def parse_verdict(text: str, regex: str = DEFAULT_META_REGEX) -> str | None:
    """'A' or 'B' from the first match of `regex` in the meta-judge's text; anything else is no verdict."""
    match = re.search(regex, text)
    if match is None:
        return None
    letter = (match.group(1) if match.groups() else match.group(0)).strip().upper()
    return letter if letter in ("A", "B") else None


def fill_template(template: str, prompt: str, response: str, **judgements: str) -> str:
    """Substitute the {slots} in one pass (so braces inside the texts stay literal)."""
    values = {"prompt": prompt, "response": response, **judgements}
    return _SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), template)
