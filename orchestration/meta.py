"""Meta-Rewarding (SPEC section 4): meta-judge outcomes -> Bradley-Terry/Elo -> judge training pairs.

For one prompt: pick the response whose judge scores vary most, let the meta-judge compare every pair of
its distinct judgements in both orders, fit Bradley-Terry strengths to the wins, and train the judge to
prefer the highest-Elo judgement over the lowest.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from actors.judges import parsing


def strip_score(judgement: str, reward_regex: str, match: str = "first") -> str:
    """The judgement without the score text its score was read from (the meta-judge must compare reasoning,
    not read off the grade): the match of judge.reward_regex that judge.score_match picks."""
    return parsing.strip_score(judgement, reward_regex, match)


def choose_candidate(scores: Sequence[Sequence[float | None]]) -> int | None:
    """Index of the response whose valid judge scores have the highest variance (>= 2 valid, variance > 0)."""
    best, best_var = None, 0.0
    for i, s in enumerate(scores):
        valid = [x for x in s if x is not None]
        if len(valid) < 2:
            continue
        var = float(np.var(valid))
        if var > best_var:
            best, best_var = i, var
    return best


def comparisons(n: int) -> list[tuple[int, int]]:
    """Ordered (A, B) presentations: every unordered pair of n judgements, in both orders."""
    return [order for a, b in itertools.combinations(range(n), 2) for order in ((a, b), (b, a))]


def win_counts(n: int, verdicts: dict[tuple[int, int], str | None]) -> np.ndarray:
    """W[i, j] = wins of i over j. a wins if it wins in both orders; a split (the same letter both times,
    position bias) is a tie that credits both; a missing verdict in either order gives nothing."""
    wins = np.zeros((n, n))
    for a, b in itertools.combinations(range(n), 2):
        first, second = verdicts.get((a, b)), verdicts.get((b, a))
        if first is None or second is None:
            continue
        if first == "A" and second == "B":
            wins[a, b] += 1
        elif first == "B" and second == "A":
            wins[b, a] += 1
        else:  # same letter both times
            wins[a, b] += 1
            wins[b, a] += 1
    return wins


def bradley_terry(wins: np.ndarray, iterations: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Strengths theta maximising sum W[i,j] log sigmoid(theta_i - theta_j).

    This is the unregularised logistic regression without intercept on features e_i - e_j. Its solution is
    defined up to a constant; Newton steps through the pseudo-inverse stay in the sum-zero subspace, which
    is also where gradient methods started from zero end up. With no finite optimum (one judgement wins
    everything) the iterations stop at the cap, with the order of the strengths already right.
    """
    n = wins.shape[0]
    theta = np.zeros(n)
    pairs = [(i, j, wins[i, j]) for i in range(n) for j in range(n) if i != j and wins[i, j] > 0]

    def loglik(t):
        return sum(w * -np.logaddexp(0.0, -(t[i] - t[j])) for i, j, w in pairs)

    for _ in range(iterations):
        grad, hess = np.zeros(n), np.zeros((n, n))
        for i, j, w in pairs:
            p = 1.0 / (1.0 + np.exp(-(theta[i] - theta[j])))
            grad[i] += w * (1 - p)
            grad[j] -= w * (1 - p)
            h = w * p * (1 - p)
            hess[i, i] += h
            hess[j, j] += h
            hess[i, j] -= h
            hess[j, i] -= h
        if np.abs(grad).max() < tol:
            break
        step = np.linalg.pinv(hess) @ grad
        current, scale = loglik(theta), 1.0
        while loglik(theta + scale * step) < current and scale > 1e-6:
            scale /= 2
        theta = theta + scale * step
    return theta - theta.mean()


def elo(wins: np.ndarray) -> np.ndarray:
    return 400.0 * bradley_terry(wins) + 1000.0


@dataclass(frozen=True)
class JudgePairChoice:
    chosen: int | None  # index of the highest-Elo judgement, None if dropped
    rejected: int | None
    reason: str = ""


def choose_judge_pair(texts: Sequence[str], scores: Sequence[float | None], wins: np.ndarray) -> JudgePairChoice:
    """(highest-Elo, lowest-Elo) judgement, or why there is none (SPEC 4.4 drop rules)."""
    ratings = elo(wins)
    if len(set(np.round(ratings, 6))) != len(ratings):
        return JudgePairChoice(None, None, "Elo values not all distinct")
    chosen, rejected = int(np.argmax(ratings)), int(np.argmin(ratings))
    if texts[chosen] == texts[rejected]:
        return JudgePairChoice(None, None, "identical judgements")
    if scores[chosen] is None or scores[rejected] is None:
        return JudgePairChoice(None, None, "a judgement has no score")
    if scores[chosen] == scores[rejected]:
        return JudgePairChoice(None, None, "equal scores")
    return JudgePairChoice(chosen, rejected)


@dataclass
class ScoreClassBalance:
    """Keeps any one chosen-score class below `max_share` of the accepted judge pairs (SPEC 4.4)."""

    max_share: float
    counts: Counter = field(default_factory=Counter)

    def admit(self, chosen_score: float) -> bool:
        total = sum(self.counts.values())
        if total and self.counts[chosen_score] >= self.max_share * total:
            return False
        self.counts[chosen_score] += 1
        return True
