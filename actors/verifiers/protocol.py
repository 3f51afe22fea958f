"""The verifier contract: a rule that scores one response from the prompt, the response and the sample's
metadata (SPEC section 2 carries `verifier_args` and every other key through), with no model.

A verifier returns the share of its checks the response passed, in [0, 1], or None when it cannot decide
(nothing to check it against). The judge maps that share onto its own scale: score = low + (high - low) x
share, as the reference's IFEval-style verifier did. Keeping verifiers on [0, 1] lets one verifier serve
any judge.score_low/score_high.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

VERIFIER_KEY = "verifier"  # the metadata key that names a sample's verifier
ARGS_KEY = "verifier_args"  # the metadata key holding what it checks against


@dataclass(frozen=True)
class Sample:
    """What a verifier sees of one response."""

    prompt: str  # the prompt's last user turn (what the reference's verifier was shown)
    response: str  # the response text without its end marker
    metadata: Mapping[str, Any] = field(default_factory=dict)  # the sample's metadata, verifier_args included

    @property
    def args(self) -> Mapping[str, Any]:
        return self.metadata.get(ARGS_KEY) or {}


@dataclass(frozen=True)
class Verdict:
    share: float | None  # of the checks passed, in [0, 1]; None: the verifier cannot decide
    note: str  # one line saying what was checked (the judgements table shows it where an LLM's text would be)


class Verifier(Protocol):
    name: str

    def check(self, metadata: Mapping[str, Any]) -> None:
        """ValueError naming the key and value when the sample's metadata cannot drive this verifier. Cheap
        (no heavy imports): the data layer calls it for every line that names this verifier."""

    def verify(self, sample: Sample) -> Verdict:
        """The share of checks `sample.response` passes. Deterministic: the same sample, the same verdict."""


def to_score(share: float, low: float, high: float) -> float:
    """A verifier's share on the judge's scale."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"a verifier returned {share}, outside [0, 1]")
    return low + (high - low) * share
