"""Judge actor: LLM-as-a-judge scoring of (prompt, response) pairs (SPEC section 3, steps 2-4).

The judge fills its template, renders it through the judge model's chat template, samples k judgements
per response and parses a score from each. Parsing looks only at the text the judge generated, so a
response that itself says "Score: 5" cannot score itself.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from statistics import fmean, pvariance
from typing import Sequence

from .engine_host import EngineHost, EngineSpec
from .engines.protocol import GenerationRequest, SamplingParams

DEFAULT_REWARD_REGEX = r"(?i)(?:score|points)\s*:\s*([-+]?\d+(?:\.\d+)?)"
DEFAULT_META_REGEX = r"(?i)winner\s*:\s*judge?ment\s*([AB])\b"  # "Judgement" and "Judgment"
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


@dataclass(frozen=True)
class JudgeSpec:
    template: str  # with {prompt} and {response} slots
    sampling: SamplingParams
    reward_regex: str = DEFAULT_REWARD_REGEX
    score_low: float = 0.0
    score_high: float = 5.0
    chat_template: str | None = None  # Jinja; None = the judge tokenizer's own
    meta_template: str | None = None  # with {prompt} {response} {judgement_a} {judgement_b}; None = no meta-judge
    meta_reward_regex: str = DEFAULT_META_REGEX
    meta_max_new_tokens: int | None = None  # the meta-judge's answer length; None = sampling.max_new_tokens


@dataclass(frozen=True)
class JudgeItem:
    prompt: str  # the prompt's user-facing text
    response: str  # the response text without its end marker
    seeds: tuple[int, ...]  # one per judgement; len(seeds) = k
    last_turn: str | None = None  # the last user turn alone: the fallback when the prompt does not fit


@dataclass
class Judgement:
    scores: list[float | None]  # one per judgement; None = no valid score
    texts: list[str] = field(repr=False)
    weight_version: int = -1
    prompt_ids: list[int] = field(default_factory=list, repr=False)  # the judge prompt as the judge saw it
    token_ids: list[list[int]] = field(default_factory=list, repr=False)  # what it generated, per judgement
    shortened: bool = False  # only the last user turn was shown (the whole prompt did not fit)
    trimmed: bool = False  # the response was cut from the end to fit
    too_long: bool = False  # even so it could not fit: no scores

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
    judgements: list[Judgement]
    generated_tokens: int


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


class JudgeActor(EngineHost):
    def __init__(self, engine: EngineSpec, spec: JudgeSpec):
        super().__init__(engine)
        from transformers import AutoTokenizer

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(engine.model_dir)
        self.max_seq_len = self.engine.max_seq_len

    def prompt_ids(self, prompt: str, response: str) -> list[int]:
        return self._chat_ids(fill_template(self.spec.template, prompt, response))

    def _chat_ids(self, content: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True, chat_template=self.spec.chat_template)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def fit(self, item: JudgeItem, judgement: Judgement) -> list[int] | None:
        """Judge prompt tokens within the context, shortening as SPEC 3 allows; None if it cannot fit.

        First the whole prompt; then only its last user turn; then the response cut from the end. The
        response is never cut to nothing: a response that cannot fit gets no judgement at all.
        """
        budget = self.max_seq_len - self.spec.sampling.max_new_tokens
        prompt = item.prompt
        ids = self.prompt_ids(prompt, item.response)
        if len(ids) <= budget:
            return ids
        if item.last_turn and item.last_turn != prompt:
            prompt = item.last_turn
            judgement.shortened = True
            ids = self.prompt_ids(prompt, item.response)
            if len(ids) <= budget:
                return ids
        response_ids = self.tokenizer.encode(item.response, add_special_tokens=False)
        keep = len(response_ids) - (len(ids) - budget)
        while keep > 0:
            judgement.trimmed = True
            ids = self.prompt_ids(prompt, self.tokenizer.decode(response_ids[:keep]))
            if len(ids) <= budget:
                return ids
            keep -= len(ids) - budget  # re-tokenising at the cut can shift a token or two
        judgement.too_long = True
        return None

    def judge(self, items: Sequence[JudgeItem]) -> JudgeBatch:
        requests, owners = [], []
        judgements = [Judgement([], [], self.engine.weight_version) for _ in items]
        for i, item in enumerate(items):
            ids = self.fit(item, judgements[i])
            if ids is None:
                judgements[i].scores = [None] * len(item.seeds)
                continue
            judgements[i].prompt_ids = ids
            for seed in item.seeds:
                requests.append(GenerationRequest(ids, self.spec.sampling, seed))
                owners.append(i)
        results = self._generate(requests)
        for owner, result in zip(owners, results):
            text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
            j = judgements[owner]
            j.texts.append(text)
            j.token_ids.append(list(result.token_ids))
            j.scores.append(parse_score(text, self.spec.reward_regex, self.spec.score_low, self.spec.score_high))
            j.weight_version = result.weight_version
        return JudgeBatch(judgements, sum(len(r.token_ids) for r in results))

    def meta_judge(self, items: Sequence[MetaItem]) -> MetaBatch:
        """Meta-judge comparisons with the same model; an item whose prompt does not fit gets no verdict."""
        if self.spec.meta_template is None:
            raise ValueError("this judge has no meta-judge template (judge.meta_template)")
        sampling = self.spec.sampling
        if self.spec.meta_max_new_tokens is not None:
            sampling = dataclasses.replace(sampling, max_new_tokens=self.spec.meta_max_new_tokens)
        budget = self.max_seq_len - sampling.max_new_tokens
        requests, owners = [], []
        for i, item in enumerate(items):
            content = fill_template(self.spec.meta_template, item.prompt, item.response,
                                    judgement_a=item.judgement_a, judgement_b=item.judgement_b)
            ids = self._chat_ids(content)
            if len(ids) <= budget:
                requests.append(GenerationRequest(ids, sampling, item.seed))
                owners.append(i)
        results = self._generate(requests)
        verdicts: list[str | None] = [None] * len(items)
        texts = [""] * len(items)
        for owner, result in zip(owners, results):
            texts[owner] = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
            verdicts[owner] = parse_verdict(texts[owner], self.spec.meta_reward_regex)
        return MetaBatch(verdicts, texts, sum(len(r.token_ids) for r in results), len(items) - len(owners))
