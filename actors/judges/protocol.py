"""The judge contract: what every judge backend (the policy, a fixed model, a remote server, a verifier)
takes and returns, as plain data that travels through Ray's object store.

A backend scores each item k times (one seed per judgement) and, if it can, meta-judges pairs of
judgements. Every judgement records the weight version that produced it: the policy's version for a
backend that follows the policy (it is refit with the generators), or FIXED for one that never changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import fmean, pvariance
from typing import Any, Literal, Mapping, Protocol, Sequence, Union

from actors.engines.protocol import SamplingParams

FIXED = "fixed"  # the weight version of a judge that does not follow the policy
WeightVersion = Union[int, Literal["fixed"]]

# "Score:" or "Points:" and a number, as real judges write it around the required line: markdown emphasis
# around the label or the number ("**Score:** 4", "Score: **4**"), a bracket ("Score: [4]", "<4>"), a
# leading-dot decimal ("Score: .5") and a scale ("4/5", "4 out of 5": the named group `of` must equal
# judge.score_high). A range ("Score: 3-4") is no score. docs/judges.md, "Parsing scores and verdicts".
DEFAULT_REWARD_REGEX = (r"(?i)(?<![a-z0-9*_])[*_]*(?:score|points)[*_]*\s*:[*_]*\s*[*_\[(<\"]*\s*"
                        r"([-+]?(?:\d+(?:\.\d+)?|\.\d+))(?![\d.]*[^\S\n]*[-\u2013][^\S\n]*\d)"
                        r"[*_\])>\"]*(?:\s*(?:/|out\s+of)\s*(?P<of>\d+(?:\.\d+)?))?[*_\])>\"]*")
# "Winner: Judgement A" ("Judgment" too), also "Winner: [Judgement A]", "**Winner:** Judgement B" and a bare
# letter that ends its line ("Winner: A", "Winner: **B**."), never "Winner: A judgement that ...".
DEFAULT_META_REGEX = (r"(?im)(?<![a-z0-9])winner[*_]*\s*:[*_]*\s*[*_\[(<\"]*\s*"
                      r"(?:judge?ment\s*(?=[AB]\b)|(?=[AB][*_\])>\".]*[^\S\n]*$))([AB])")


@dataclass(frozen=True)
class JudgeSpec:
    """How an LLM judge prompts and parses (SPEC section 3)."""

    template: str  # with {prompt} and {response} slots
    sampling: SamplingParams
    reward_regex: str = DEFAULT_REWARD_REGEX
    score_match: str = "first"  # which match of the score and verdict patterns counts: "first" | "last"
    score_low: float = 0.0
    score_high: float = 5.0
    chat_template: str | None = None  # Jinja; None = the judge tokenizer's own
    meta_template: str | None = None  # with {prompt} {response} {judgement_a} {judgement_b}; None = no meta-judge
    meta_reward_regex: str = DEFAULT_META_REGEX
    meta_max_new_tokens: int | None = None  # the meta-judge's answer length; None = sampling.max_new_tokens
    meta_temperature: float | None = None  # the meta-judge's temperature (0 = greedy); None = sampling.temperature
    follows_policy: bool = True  # the judge is M_t (refit with the generators); False: fixed weights


@dataclass(frozen=True)
class JudgeItem:
    prompt: str  # the prompt's user-facing text
    response: str  # the response text without its end marker
    seeds: tuple[int, ...]  # one per judgement; len(seeds) = k
    last_turn: str | None = None  # the last user turn alone: the fallback when the prompt does not fit
    # A rule-based reward (actors/verifiers): the verifier that scores this item, and the sample's metadata
    # it reads (verifier_args). None: an LLM judge scores it (a verifier backend: no verifier applies).
    verifier: str | None = None
    metadata: Mapping[str, Any] | None = field(default=None, hash=False, repr=False)


@dataclass
class Judgement:
    scores: list[float | None]  # one per judgement; None = no valid score
    texts: list[str] = field(repr=False)
    weight_version: WeightVersion = -1
    prompt_ids: list[int] = field(default_factory=list, repr=False)  # the judge prompt as the judge saw it
    token_ids: list[list[int]] = field(default_factory=list, repr=False)  # what it generated, per judgement
    shortened: bool = False  # only the last user turn was shown (the whole prompt did not fit)
    trimmed: bool = False  # the response was cut from the end to fit
    too_long: bool = False  # even so it could not fit: no scores
    verifier: str | None = None  # the verifier that scored it (k equal scores, no tokens); None: an LLM judge

    @property
    def valid(self) -> list[float]:
        return [s for s in self.scores if s is not None]

    @property
    def mean(self) -> float | None:
        return fmean(self.valid) if self.valid else None

    @property
    def variance(self) -> float | None:
        return pvariance(self.valid) if self.valid else None


@dataclass
class JudgeBatch:
    judgements: list[Judgement]  # in item order
    generated_tokens: int
    # The backend's own counters for this call (a remote judge: requests, retries, failures, latency), summed
    # by the orchestrator into per-backend metrics; empty for a backend with none.
    backend_stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MetaItem:
    """One meta-judge comparison: which of two judgements (score text already stripped) is better."""

    prompt: str
    response: str
    judgement_a: str
    judgement_b: str
    seed: int


@dataclass
class MetaBatch:
    verdicts: list[str | None]  # "A", "B" or None, per item
    texts: list[str] = field(repr=False)
    generated_tokens: int = 0
    too_long: int = 0  # items whose prompt did not fit the judge's context (no verdict)
    backend_stats: dict[str, float] = field(default_factory=dict)  # as JudgeBatch.backend_stats


class JudgeBackend(Protocol):
    """What a judge pool's actors serve (the orchestrator calls these through Ray). Every Judgement records
    the weight version that produced it, or FIXED for a judge that does not follow the policy."""

    can_meta_judge: bool

    def judge(self, items: Sequence[JudgeItem]) -> JudgeBatch:
        """len(item.seeds) judgements per item, in item order; a judgement with no valid score is None."""

    def meta_judge(self, items: Sequence[MetaItem]) -> MetaBatch:
        """A verdict per item ("A", "B" or None); ValueError for a backend that cannot meta-judge."""
