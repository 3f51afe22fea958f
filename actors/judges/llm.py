"""An LLM-as-a-judge over any engine (SPEC section 3, steps 2-4; section 4 for the meta-judge).

It fills the judge template, renders it through the judge model's chat template, samples k judgements per
response and parses a score from each. The engine is reached only through `generate`, so the same judge
runs on the policy's engine, a fixed judge model's, or any other engine behind the protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from actors.engines.protocol import GenerationRequest, GenerationResult

from .parsing import fill_template, parse_score, parse_verdict
from .protocol import FIXED, JudgeBatch, JudgeItem, JudgeSpec, Judgement, MetaBatch, MetaItem

Generate = Callable[[list[GenerationRequest]], list[GenerationResult]]


def vocab_digest(tokenizer) -> str:
    """A fingerprint of a tokenizer's vocabulary (token -> id): equal digests read token ids alike."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


class LLMJudge:
    def __init__(self, spec: JudgeSpec, tokenizer, max_seq_len: int, generate: Generate):
        self.spec, self.tokenizer, self.max_seq_len, self.generate = spec, tokenizer, max_seq_len, generate

    @property
    def can_meta_judge(self) -> bool:
        return self.spec.meta_template is not None

    def vocab_digest(self) -> str:
        return vocab_digest(self.tokenizer)

    def prompt_ids(self, prompt: str, response: str) -> list[int]:
        return self._chat_ids(fill_template(self.spec.template, prompt, response))

    def _chat_ids(self, content: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True, chat_template=self.spec.chat_template)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _version(self, result: GenerationResult):
        return result.weight_version if self.spec.follows_policy else FIXED

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
        judgements = [Judgement([], []) for _ in items]
        for i, item in enumerate(items):
            ids = self.fit(item, judgements[i])
            if ids is None:
                judgements[i].scores = [None] * len(item.seeds)
                continue
            judgements[i].prompt_ids = ids
            for seed in item.seeds:
                requests.append(GenerationRequest(ids, self.spec.sampling, seed))
                owners.append(i)
        results = self.generate(requests)
        for owner, result in zip(owners, results):
            text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
            j = judgements[owner]
            j.texts.append(text)
            j.token_ids.append(list(result.token_ids))
            # only the judge's own generated text is parsed, never the prompt or response it was shown
            j.scores.append(parse_score(text, self.spec.reward_regex, self.spec.score_low, self.spec.score_high,
                                        self.spec.score_match))
            j.weight_version = self._version(result)
        return JudgeBatch(judgements, sum(len(r.token_ids) for r in results))

    def meta_judge(self, items: Sequence[MetaItem]) -> MetaBatch:
        """Meta-judge comparisons with the same model; an item whose prompt does not fit gets no verdict."""
        if self.spec.meta_template is None:
            raise ValueError("this judge has no meta-judge template (judge.meta_template)")
        sampling = self.spec.sampling
        if self.spec.meta_max_new_tokens is not None:
            sampling = dataclasses.replace(sampling, max_new_tokens=self.spec.meta_max_new_tokens)
        if self.spec.meta_temperature is not None:
            sampling = dataclasses.replace(sampling, temperature=self.spec.meta_temperature)
        budget = self.max_seq_len - sampling.max_new_tokens
        requests, owners = [], []
        for i, item in enumerate(items):
            content = fill_template(self.spec.meta_template, item.prompt, item.response,
                                    judgement_a=item.judgement_a, judgement_b=item.judgement_b)
            ids = self._chat_ids(content)
            if len(ids) <= budget:
                requests.append(GenerationRequest(ids, sampling, item.seed))
                owners.append(i)
        results = self.generate(requests)
        verdicts: list[str | None] = [None] * len(items)
        texts = [""] * len(items)
        for owner, result in zip(owners, results):
            texts[owner] = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
            verdicts[owner] = parse_verdict(texts[owner], self.spec.meta_reward_regex, self.spec.score_match)
        return MetaBatch(verdicts, texts, sum(len(r.token_ids) for r in results), len(items) - len(owners))
