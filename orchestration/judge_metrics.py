"""Per-backend judge metrics: the same names for every judge backend (policy, model, triton, verifier).

    judge/<backend>/judgements          judgements the backend was asked for (k per judged response)
    judge/<backend>/parse_rate          the share of them that gave a valid score
    judge/<backend>/score_mean          the mean of the valid scores
    judge/<backend>/score_share/<bin>   the share of the valid scores in each bin of [score_low, score_high]
    judge/<backend>/calls               judge calls answered (a chunk of prompts each)
    judge/<backend>/latency_s           mean seconds from issuing a judge call to its result, as the orchestrator
                                        sees it (queueing on the replica included; a call issued again after
                                        its replica died counts from the first issue)
    judge/<backend>/latency_max_s       the slowest of them
    judge/<backend>/meta_calls, meta_latency_s, meta_latency_max_s: the same for meta-judge calls

The first four count the judgements of the batch's prompts (OutcomeStats.judge_scores: deterministic, a
resumed run gives the same); the latencies count calls answered since the previous step. Judgements of
verifier-named samples scored beside an LLM judge are not the backend's (they are under scored_by/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

JUDGEMENTS, VALID, SCORE_SUM = "judgements", "valid", "score_sum"
BIN = "bin/"  # OutcomeStats.judge_scores keys: "judgements", "valid", "score_sum", "bin/<label>"
MAX_INTEGER_BINS = 20  # an integer scale wider than this gets 10 equal bins instead of one per value
EQUAL_BINS = 10


def score_bin(score: float, low: float, high: float) -> str:
    """The histogram bin of a valid score. On an integer scale of 2 to 20 steps (the default 0..5) a bin per
    point, b holding [b, b+1) and the top value its own (so 4.5 is in "4", 5 in "5"); otherwise (0..1, or
    0..100) 10 equal bins named by their lower edge, the top value in the last."""
    if float(low).is_integer() and float(high).is_integer() and 2 <= high - low <= MAX_INTEGER_BINS:
        return str(int(math.floor(score)))
    width = (high - low) / EQUAL_BINS
    index = min(EQUAL_BINS - 1, int((score - low) // width))
    return f"{low + index * width:g}"


def count_scores(counts: dict, scores: Iterable[float | None], low: float, high: float) -> None:
    """Add one response's judgements (None: no valid score) to OutcomeStats.judge_scores-style counts."""
    for s in scores:
        counts[JUDGEMENTS] = counts.get(JUDGEMENTS, 0) + 1
        if s is None:
            continue
        counts[VALID] = counts.get(VALID, 0) + 1
        counts[SCORE_SUM] = counts.get(SCORE_SUM, 0.0) + s
        key = BIN + score_bin(s, low, high)
        counts[key] = counts.get(key, 0) + 1


def score_metrics(backend: str, counts: dict) -> dict:
    """judge/<backend>/{judgements, parse_rate, score_mean, score_share/<bin>} from judge_scores counts."""
    n = counts.get(JUDGEMENTS, 0)
    if not n:
        return {}
    prefix, valid = f"judge/{backend}", counts.get(VALID, 0)
    out = {f"{prefix}/judgements": n, f"{prefix}/parse_rate": valid / n}
    if valid:
        out[f"{prefix}/score_mean"] = counts.get(SCORE_SUM, 0.0) / valid
        for key, c in sorted(counts.items()):
            if key.startswith(BIN):
                out[f"{prefix}/score_share/{key[len(BIN):]}"] = c / valid
    return out


@dataclass
class CallLatency:
    """Seconds per answered call of one stage (judge or meta_judge) since the last take."""

    calls: int = 0
    seconds: float = 0.0
    max_seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.calls += 1
        self.seconds += seconds
        self.max_seconds = max(self.max_seconds, seconds)

    def take(self, backend: str, name: str = "") -> dict:
        """judge/<backend>/{name}calls, {name}latency_s, {name}latency_max_s; empty when no call was answered."""
        if not self.calls:
            return {}
        prefix = f"judge/{backend}/{name}"
        out = {f"{prefix}calls": self.calls, f"{prefix}latency_s": self.seconds / self.calls,
               f"{prefix}latency_max_s": self.max_seconds}
        self.calls, self.seconds, self.max_seconds = 0, 0.0, 0.0
        return out
