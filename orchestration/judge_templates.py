"""The judge prompts a run uses: `judge.template` and `judge.meta_template` name one of these ("default",
"toy"), a file, or are the template text itself. Resolved and checked at start-up (config.validate), before
any model is built or Ray started.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

JUDGE_SLOTS = ("{prompt}", "{response}")
META_SLOTS = ("{prompt}", "{response}", "{judgement_a}", "{judgement_b}")

# An additive 5-point rubric in the style of the Self-Rewarding paper's LLM-as-a-judge prompt.
DEFAULT_TEMPLATE = """\
Read the user's request and the candidate response below, then grade the response on a 5-point scale
that is built up one criterion at a time. Start from 0 and:
- add 1 point if the response is on topic and gives at least some information that bears on the
  request, even if it is incomplete or contains some irrelevant material;
- add a 2nd point if it covers a good part of what was asked, even if it does not fully settle the
  request or give a direct answer;
- add a 3rd point if it answers the core of the request in a useful way, even if it is not thorough or
  has minor flaws;
- add a 4th point if it speaks as a helpful assistant, handles the request directly and completely, and
  is clear and well organised, with only small room to be tighter or more focused;
- add a 5th point if it fits the request exactly, carries no filler, shows real expertise, and reads
  as a high-quality, insightful answer.

Request:
{prompt}

Response:
{response}

Explain your grade in at most 100 words, then give it on the last line exactly as "Score: <points>"."""

# The meta-judge prompt (Meta-Rewarding): two judgements of the same response, their score lines removed.
DEFAULT_META_TEMPLATE = """\
You are checking the work of two graders. Each read the user's request and the response below and
wrote an assessment of the response against this rubric: one point each for a response that is on
topic and informative; that covers a good part of the request; that answers its core usefully; that
is direct, complete, clear and well organised; and that fits the request exactly with real
expertise and no filler.

Request:
{prompt}

Response:
{response}

Judgement A:
{judgement_a}

Judgement B:
{judgement_b}

Decide which judgement applies the rubric more faithfully: which one is more accurate about what the
response does and does not do, more consistent in its reasoning, and more careful. Do not prefer a
judgement for its length or its position. Explain briefly, then end with one line, exactly
"Winner: Judgement A" or "Winner: Judgement B"."""


def resolve(key: str, value: str) -> str:
    """The template text for `key` (judge.template or judge.meta_template): "default", "toy" (the toy
    world's, orchestration/toy/task.py), a file path, or the text itself; ConfigError when a slot is missing."""
    meta = key == "judge.meta_template"
    if value == "default":
        return DEFAULT_META_TEMPLATE if meta else DEFAULT_TEMPLATE
    if value == "toy":
        from .toy import task

        return task.META_JUDGE_TEMPLATE if meta else task.JUDGE_TEMPLATE
    path = Path(value).expanduser()
    if "\n" not in value and len(value) < 4096 and path.is_file():
        value = path.read_text()
    missing = [slot for slot in (META_SLOTS if meta else JUDGE_SLOTS) if slot not in value]
    if missing:
        raise ConfigError(f"{key} lacks the slot(s) {', '.join(missing)} (\"default\", a file path or the "
                          "template text)")
    return value
