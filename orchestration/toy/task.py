"""The toy task: small integer addition, with an additive 5-point rubric a judge can be checked against.

A question is "What is 47 + 38?" (operands 0 to model.toy.max_operand, 49 by default); the ground-truth
answer is the number. The rubric follows the additive idea of the Self-Rewarding paper's judge prompt (one
point per criterion met, criteria getting stricter):
  1. the reply is a number;  2. it has the right number of digits;  3. its last digit is right;
  4. its first digit is right;  5. it is exactly right.
The judge first works the sum out column by column with carries (its "justification", the way a real
judge reasons before it scores), then writes one line per criterion and "Score: <points>". Column
addition is far easier for a small model than producing the sum in one go, so the judge can be right
more often than the generator: the gap Self-Rewarding feeds on. Because the rubric is computable from the
ground truth, the run can measure judge accuracy, which no real deployment can.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

QUESTION_FORMS = ("What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "{a} + {b} = ?")
CRITERIA = ("Number", "Digits", "Last", "First", "Exact")
JUDGE_TEMPLATE = "Grade 0-5, a point per check.\nQuestion: {prompt}\nAnswer: {response}"
META_JUDGE_TEMPLATE = ("Which grading is right?\nQuestion: {prompt}\nAnswer: {response}\n"
                       "Judgement A:\n{judgement_a}\nJudgement B:\n{judgement_b}")
SCORE_LINE = re.compile(r"\nScore: \d+$")
_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    form: int

    @property
    def question(self) -> str:
        return QUESTION_FORMS[self.form].format(a=self.a, b=self.b)

    @property
    def answer(self) -> int:
        return self.a + self.b

    def metadata(self) -> dict:
        return {"task": "add", "operands": [self.a, self.b], "answer": self.answer}


def sample_problem(rng: random.Random, max_operand: int) -> Problem:
    return Problem(rng.randint(0, max_operand), rng.randint(0, max_operand), rng.randrange(len(QUESTION_FORMS)))


def criteria_met(response: str, answer: int) -> tuple[bool, ...]:
    """Which of the five rubric criteria a response meets (the later ones need it to be a number)."""
    text = response.strip()
    if not _NUMBER.fullmatch(text):
        return (False,) * 5
    truth = str(answer)
    return (True, len(text) == len(truth), text[-1] == truth[-1], text[0] == truth[0], text == truth)


def rubric_score(response: str, answer: int) -> int:
    return sum(criteria_met(response, answer))


def column_sum(a: int, b: int) -> list[str]:
    """Column addition, lowest digit first: "7+8+0=15", "4+3+1=8", then "Sum: 85"."""
    lines, carry, width = [], 0, max(len(str(a)), len(str(b)))
    for i in range(width):
        x, y = a // 10**i % 10, b // 10**i % 10
        total = x + y + carry
        lines.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return lines + [f"Sum: {a + b}"]


def judgement_text(problem: Problem, response: str) -> str:
    """The judgement a perfect judge writes: the worked sum, each criterion with what it compared, the score.

    Spelling out the compared parts ("Last: 9 vs 8 no") makes every check a copy-and-compare step.
    """
    text, truth = response.strip(), str(problem.answer)
    met = criteria_met(text, problem.answer)
    lines = column_sum(problem.a, problem.b) + [f"Number: {_yes(met[0])}"]
    if met[0]:
        compared = [(len(text), len(truth)), (text[-1], truth[-1]), (text[0], truth[0]), (text, truth)]
        lines += [f"{name}: {got} vs {want} {_yes(ok)}" for name, (got, want), ok in zip(CRITERIA[1:], compared, met[1:])]
    else:
        lines += [f"{name}: no" for name in CRITERIA[1:]]
    return "\n".join(lines + [f"Score: {sum(met)}"])


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def is_correct(response: str, answer: int) -> bool:
    return response.strip() == str(answer)


def candidate_answers(rng: random.Random, answer: int) -> str:
    """A plausible answer of varying quality, to teach the judge every rubric level."""
    truth = str(answer)
    kind = rng.random()
    if kind < 0.3:
        return truth
    if kind < 0.8:  # one digit changed
        i = rng.randrange(len(truth))
        digit = rng.choice([d for d in "0123456789" if d != truth[i]] or ["1"])
        out = truth[:i] + digit + truth[i + 1 :]
        return out.lstrip("0") or "0"
    if kind < 0.9:  # a digit dropped or added
        if len(truth) > 1 and rng.random() < 0.5:
            i = rng.randrange(len(truth))
            return truth[:i] + truth[i + 1 :]
        return truth + rng.choice("0123456789")
    return rng.choice(["I am not sure.", "many", "It is big.", "no idea"])


def without_score(judgement: str) -> str:
    """A judgement as the meta-judge sees it: the score line removed."""
    return SCORE_LINE.sub("", judgement)


def confused_judgement(rng: random.Random, problem: Problem, response: str) -> str:
    """A plausible wrong judgement: worked out for a slightly wrong operand, so its sum and checks are off."""
    delta = rng.choice([-3, -2, -1, 1, 2, 3])
    wrong = Problem(max(0, problem.a + delta), problem.b, problem.form)
    if wrong.answer == problem.answer:
        wrong = Problem(problem.a + 4, problem.b, problem.form)
    return judgement_text(wrong, response)


def meta_judgement_text(problem: Problem, winner: str) -> str:
    """The meta-judge's answer: the sum worked out again, then the judgement that matches it."""
    return "\n".join(column_sum(problem.a, problem.b) + [f"Winner: Judgement {winner}"])
