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
    return _judgement(column_sum(problem.a, problem.b), str(problem.answer), response)


def _judgement(work: list[str], believed: str, response: str, flip: int | None = None,
               miscopy: str | None = None) -> str:
    """A judgement from worked lines ending in "Sum: <believed>", graded against `believed`; `flip` inverts one
    check's verdict and `miscopy` replaces the response's digit a check reads (both: judge slips)."""
    text = response.strip()
    met = list(criteria_met(text, int(believed)))
    lines = work + [f"Number: {_yes(met[0])}"]
    if met[0]:
        got = miscopy if miscopy is not None else text
        compared = [(len(text), len(believed)), (got[-1], believed[-1]), (got[0], believed[0]), (text, believed)]
        if miscopy is not None:  # the slip decides the last- and first-digit checks it touched
            met[2], met[3] = got[-1] == believed[-1], got[0] == believed[0]
        checks = list(zip(CRITERIA[1:], compared, met[1:]))
    else:
        checks = [(name, None, False) for name in CRITERIA[1:]]
    if flip is not None:
        met[flip] = not met[flip]
        if flip == 0:
            lines[-1] = f"Number: {_yes(met[0])}"
        else:
            name, pair, ok = checks[flip - 1]
            checks[flip - 1] = (name, pair, not ok)
    lines += [f"{name}: {pair[0]} vs {pair[1]} {_yes(ok)}" if pair else f"{name}: {_yes(ok)}"
              for name, pair, ok in checks]
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


FLAWS = ("operand", "column", "sum", "verdict", "copy")


def flawed_judgement(rng: random.Random, problem: Problem, response: str, flaw: str | None = None) -> str:
    """A plausible wrong judgement with one slip of the kinds a sampled judge makes: a misread operand or a
    wrong column total (the sum and every check follow from it), a wrong "Sum" line, one check's verdict
    flipped, or a digit of the answer miscopied. Every kind changes a worked line or a check, so the result
    always differs from the right judgement (tests/test_toy_world.py checks it)."""
    return _flawed(rng, problem, response, flaw or rng.choice(FLAWS))


def _flawed(rng: random.Random, problem: Problem, response: str, flaw: str) -> str:
    a, b, truth = problem.a, problem.b, str(problem.answer)
    if flaw == "operand":
        wrong = max(0, a + rng.choice([-3, -2, -1, 1, 2, 3]))
        wrong = wrong if wrong != a else a + 4
        return judgement_text(Problem(wrong, b, problem.form), response)
    if flaw == "column":
        work, believed = _column_sum_with_slip(a, b, rng)
        return _judgement(work, believed, response)
    if flaw == "sum":
        i = rng.randrange(len(truth))
        digit = rng.choice([d for d in "0123456789" if d != truth[i] and not (i == 0 and d == "0" and len(truth) > 1)])
        believed = truth[:i] + digit + truth[i + 1 :]
        return _judgement(column_sum(a, b)[:-1] + [f"Sum: {believed}"], believed, response)
    text = response.strip()
    is_number = criteria_met(text, problem.answer)[0]
    if flaw == "verdict" or not is_number:
        return _judgement(column_sum(a, b), truth, response, flip=rng.randrange(5) if is_number else 0)
    i = rng.choice([0, len(text) - 1])  # "copy": the first or last digit, read wrong
    digit = rng.choice([d for d in "0123456789" if d != text[i]])
    return _judgement(column_sum(a, b), truth, response, miscopy=text[:i] + digit + text[i + 1 :])


def _column_sum_with_slip(a: int, b: int, rng: random.Random) -> tuple[list[str], str]:
    """Column addition with one column's total off by one; the carries and the sum follow from it."""
    width = max(len(str(a)), len(str(b)))
    slip = rng.randrange(width)
    lines, digits, carry = [], [], 0
    for i in range(width):
        x, y = a // 10**i % 10, b // 10**i % 10
        total = x + y + carry
        if i == slip:
            total = total + 1 if total == 0 or rng.random() < 0.5 else total - 1
        lines.append(f"{x}+{y}+{carry}={total}")
        digits.append(str(total % 10))
        carry = total // 10
    believed = (str(carry) if carry else "") + "".join(reversed(digits))
    believed = believed.lstrip("0") or "0"
    return lines + [f"Sum: {believed}"], believed


def judged_sum(judgement: str) -> str:
    """The sum a judgement worked out (its "Sum: " line), or "?" when it has none."""
    found = re.search(r"^Sum: (\S+)$", judgement, re.MULTILINE)
    return found.group(1) if found else "?"


def verdicts(judgement: str) -> str:
    """A judgement's five check verdicts as a string, one letter per criterion: "yyynn"; "?" for a check it lacks
    or ends in neither yes nor no. The score is the number of y's, so two judgements that score differently
    always differ here, whatever their worked lines say."""
    found: dict[str, str] = {}
    for line in judgement.splitlines():
        name, _, rest = line.partition(": ")
        if name in CRITERIA and name not in found:
            found[name] = "y" if rest.endswith("yes") else "n" if rest.endswith("no") else "?"
    return "".join(found.get(name, "?") for name in CRITERIA)


def meta_judgement_text(problem: Problem, response: str, winner: str, judgement_a: str, judgement_b: str) -> str:
    """The meta-judge's answer: it grades the response itself (the worked sum and the five checks, as a judge
    does), then compares each judgement's verdicts with its own ("A: yynnn vs yyynn no"), then names the winner.

    The verdicts decide the score, so this catches every slip that changes a score: a wrong sum, a flipped
    verdict, a miscopied digit. Checking only each judgement's "Sum" line (the earlier design) left the model
    at chance on flipped verdicts and miscopied digits, about half of a sampled judge's real errors.
    """
    own = without_score(judgement_text(problem, response))
    truth = verdicts(own)
    checks = [f"{name}: {verdicts(j)} vs {truth} {_yes(verdicts(j) == truth)}"
              for name, j in (("A", judgement_a), ("B", judgement_b))]
    return "\n".join([own, *checks, f"Winner: Judgement {winner}"])
