"""Streaming rollouts: prompt chunks -> generator pool -> judge pool (-> meta-judge on the judge pool)
-> scored prompts, in prompt order.

A response whose sample names a verifier (actors/verifiers) is scored by that verifier, the others by the
judge (SPEC 4b): with an LLM judge, the verifiers run here, in the orchestrator, and only the rest go to the
judge pool; with judge.backend=verifier the pool itself scores everything.

Chunks go round-robin to replicas and run concurrently with each other and with learner steps; results
are released strictly in submission order so the pairs (and so every batch) are the same whatever the
number of replicas or the timing. Request seeds are derived from (seed, iteration, prompt index, sample
index) (SPEC section 9), never from the replica, the batch or the epoch: a later epoch of an iteration sees
the same responses and judgements as the first, as if the iteration's data had been generated once.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import ray
from ray.exceptions import RayError

from actors.engines.protocol import GenerationRequest, GenerationResult, SamplingParams
from actors import verifiers
from actors.judges.protocol import JudgeBatch, JudgeItem, Judgement, MetaItem

from . import meta
from .cluster import RECOVERABLE
from .faults import crash_point
from .judge_metrics import CallLatency
from .rollout_journal import RolloutJournal, chunk_key


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def response_text(tokenizer, result: GenerationResult) -> str:
    """A response as people (and the judge) read it: without its end token or stop string."""
    text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if result.stop_text and text.endswith(result.stop_text):
        text = text[: -len(result.stop_text)]
    return text.strip()


@dataclass(frozen=True)
class PromptRecord:
    index: int  # position in the prompt dataset
    epoch: int
    prompt_ids: list[int]
    user_text: str  # what the judge sees as the prompt
    last_user_text: str  # the judge's fallback when the whole prompt does not fit
    metadata: dict
    answer_ids: list[int] | None = None  # the ground-truth answer's tokens (SPIN)


@dataclass
class MetaJudged:
    """Meta-judge verdicts on the judgements of one response of a prompt."""

    response: int  # index of the response whose judgements were compared
    judgements: list[int]  # indices (into that response's judgements) of its distinct judgements
    verdicts: dict[tuple[int, int], str | None]  # (A, B) positions in `judgements` -> "A" | "B" | None
    texts: dict[tuple[int, int], str] = field(default_factory=dict)  # what the meta-judge wrote, per comparison


@dataclass
class ScoredPrompt:
    record: PromptRecord
    responses: list[GenerationResult]
    texts: list[str]  # response text without the end marker
    judgements: list[Judgement | None]  # None where the response was not judged (did not end properly)
    meta: MetaJudged | None = None  # with the meta-judge, when the prompt had a candidate
    version: int | None = None  # the weight version its chunk was scheduled at (streaming refits); None: the pools'


@dataclass
class _Call:
    """A remote call of a chunk, kept so it can be issued again if its replica dies."""

    stage: str  # "generate" | "judge" | "meta_judge" (the actor method)
    pool: object  # EnginePool
    replica: int
    args: tuple
    ref: object = None
    issued: float | None = None  # perf_counter at the first issue: the call's latency (judge_metrics)
    version: int | None = None  # streaming refits: the weight version the replica must serve for this call
    replayed: bool = False  # its result came from the rollout journal, not from the pool


@dataclass
class _Chunk:
    records: list[PromptRecord]
    version: int | None = None  # streaming refits: every call of this chunk runs at this weight version
    call: _Call | None = None
    meta_plan: list[tuple[int, int, list[int], list[tuple[int, int]]]] = field(default_factory=list)
    responses: list[list[GenerationResult]] = field(default_factory=list)
    texts: list[list[str]] = field(default_factory=list)
    scored: list[ScoredPrompt] = field(default_factory=list)
    result: list[ScoredPrompt] | None = None
    verified: dict[int, Judgement] = field(default_factory=dict)  # judged-response position -> verifier's judgement
    key: tuple | None = None  # with a rollout journal: what its calls are recorded under

    @property
    def waiting_on(self):
        """The remote call this chunk waits for, or None when it is finished."""
        return None if self.result is not None else self.call.ref


@dataclass
class PoolCounters:
    """Generated tokens of each pool since the last `take`, for throughput metrics."""

    generator_tokens: int = 0
    judge_tokens: int = 0
    meta_too_long: int = 0  # meta-judge prompts that did not fit (run total)
    total_tokens: int = 0  # generated by both pools since the pipeline started (the progress bar's rate)
    backend: dict = field(default_factory=dict)  # the judge backend's own counters since the last take_backend
    refit_loads: int = 0  # streaming refits: weight loads replicas made before a call, since the last take_refits
    refit_wait_s: float = 0.0  # ... and the replica-seconds they spent on them (not generating)

    def take_refits(self) -> tuple[int, float]:
        out = (self.refit_loads, self.refit_wait_s)
        self.refit_loads, self.refit_wait_s = 0, 0.0
        return out

    def add(self, generator: int = 0, judge: int = 0) -> None:
        self.generator_tokens += generator
        self.judge_tokens += judge
        self.total_tokens += generator + judge

    def add_backend(self, stats: dict) -> None:
        """Sum a judge call's backend_stats in (a `_max_` key keeps the largest value)."""
        for key, value in stats.items():
            self.backend[key] = max(self.backend.get(key, 0.0), value) if "_max_" in key else \
                self.backend.get(key, 0.0) + value

    def take_backend(self) -> dict:
        out, self.backend = self.backend, {}
        return out

    def take(self) -> tuple[int, int]:
        out = (self.generator_tokens, self.judge_tokens)
        self.generator_tokens = self.judge_tokens = 0
        return out


class RolloutPipeline:
    """`generators` and `judges` are EnginePools (orchestration.cluster): a call whose replica died is
    issued again, with the same seeds, once the pool has the replica back at the current weights."""

    def __init__(self, generators, judges, records: Iterator[PromptRecord], *, tokenizer,
                 sampling: SamplingParams, num_responses: int, num_evals: int, chunk_size: int, seed: int,
                 iteration: int, meta_judge: bool = False, score_regex: str | None = None,
                 score_match: str = "first", local_verifiers=None, default_verifier: str | None = None):
        """`meta_judge`: run the meta-judge on each prompt's most disputed response, its judgements shown with
        their score text removed by `score_regex` at the match `score_match` picks (judge.reward_regex,
        judge.score_match). `local_verifiers` (a VerifierJudge): scores the responses of verifier-named
        samples in this process; None: the judge pool scores every response (judge.backend=verifier).
        `default_verifier`: the verifier of samples that name none (judge.default_verifier)."""
        self.generators, self.judges = generators, judges
        self._records = records
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.n, self.k = num_responses, num_evals
        self.chunk_size = chunk_size
        self.seed, self.iteration = seed, iteration
        self.meta_judge, self.score_regex, self.score_match = meta_judge, score_regex, score_match
        self.local_verifiers, self.default_verifier = local_verifiers, default_verifier
        if num_evals and not judges:
            raise ValueError("judging needs at least one judge replica")
        if meta_judge and score_regex is None:
            raise ValueError("the meta-judge needs the judge's score regex (to strip scores from judgements)")
        self._chunks: deque[_Chunk] = deque()
        self._submitted = 0
        self._judge_calls = 0
        self.released = 0  # records handed out by pop_ready (the data position a checkpoint keeps)
        self.counters = PoolCounters()
        self.latency = {"judge": CallLatency(), "meta_judge": CallLatency()}  # per stage, since the last take
        self.started = time.perf_counter()
        # Streaming refits (orchestration/streaming.py): a WeightVersions; every call to a pool that follows the
        # policy then names its chunk's version and carries that version's buckets. None: the pools' weights.
        self.weights = None
        # checkpoint.record_rollouts: every call's result is recorded before it is used, and a call recorded by
        # an earlier (killed) run of the same configuration is answered from the record (rollout_journal.py).
        self.journal: RolloutJournal | None = None

    # ---- driving -----------------------------------------------------------------------------------

    @property
    def prompts_in_flight(self) -> int:
        return sum(len(c.records) for c in self._chunks)

    def submit_next(self, version: int | None = None) -> bool:
        """Submit the next chunk of prompts for generation, at weight `version` with streaming refits (None:
        whatever the pools serve); False when the prompt stream is over."""
        records = []
        for record in self._records:
            records.append(record)
            if len(records) == self.chunk_size:
                break
        if not records:
            return False
        chunk = _Chunk(records, version)
        if self.journal is not None:
            chunk.key = chunk_key(self.iteration, records, version)
        requests = [GenerationRequest(r.prompt_ids, self.sampling,
                                      derive_seed(self.seed, self.iteration, r.index, j, "gen"))
                    for r in records for j in range(self.n)]
        self._issue(chunk, _Call("generate", self.generators, self._submitted % len(self.generators), (requests,),
                                 version=version))
        crash_point("generation")
        self._chunks.append(chunk)
        self._submitted += 1
        return True

    def pending(self) -> list:
        """Object refs worth waiting on."""
        return [c.waiting_on for c in self._chunks if c.waiting_on is not None]

    def advance(self, ready: set) -> None:
        """Move every chunk whose remote call finished on to its next stage (or issue it again if its
        replica died)."""
        for chunk in self._chunks:
            ref = chunk.waiting_on
            if ref is None or ref not in ready:
                continue
            call = chunk.call
            try:
                value = ray.get(ref)
            except RECOVERABLE as e:
                call.pool.recover(call.replica, e)
                self._issue(chunk, call)
                continue
            except RayError as e:  # failed in the replica's own code (out of memory, a bug): stop, say where
                raise call.pool.call_failed(call.replica, call.stage, e) from None
            if self._versioned(call):
                value, seconds = value
                self.counters.refit_loads += seconds is not None
                self.counters.refit_wait_s += seconds or 0.0
            if self.journal is not None and not call.replayed:
                self.journal.record(chunk.key, call.stage, value)
            if call.stage in self.latency:
                self.latency[call.stage].add(time.perf_counter() - call.issued)
            {"generate": self._start_judging, "judge": self._collect_judgements,
             "meta_judge": self._collect_meta}[call.stage](chunk, value)

    def pop_ready(self) -> list[ScoredPrompt]:
        """Scored prompts of the finished chunks at the head of the queue, in submission order."""
        return [scored for chunk in self.pop_ready_chunks() for scored in chunk]

    def pop_ready_chunks(self) -> list[list[ScoredPrompt]]:
        """The same, one list per chunk (streaming refits schedule by chunk)."""
        out: list[list[ScoredPrompt]] = []
        while self._chunks and self._chunks[0].result is not None:
            out.append(self._chunks.popleft().result)
        self.released += sum(len(c) for c in out)
        return out

    def _issue(self, chunk: _Chunk, call: _Call) -> None:
        if call.issued is None:
            call.issued = time.perf_counter()
        if self.journal is not None:
            call.replayed, value = self.journal.get(chunk.key, call.stage)
            if call.replayed:  # through the object store, so that it is waited on and taken as a pool's result
                call.ref = ray.put((value, None) if self._versioned(call) else value)
                chunk.call = call
                return
        if self._versioned(call):
            # The replica loads this version first if it serves another one (engine_host.call_at).
            call.ref = call.pool.call(call.replica, "call_at", call.version, call.stage, call.args,
                                      *self.weights.refs(call.version))
        else:
            call.ref = call.pool.call(call.replica, call.stage, *call.args)
        chunk.call = call

    def _versioned(self, call: _Call) -> bool:
        """Whether `call` goes through call_at: streaming refits, to a pool that follows the policy."""
        return call.version is not None and call.pool.follows_policy and self.weights is not None

    def _next_judge(self) -> int:
        self._judge_calls += 1
        return (self._judge_calls - 1) % len(self.judges)

    # ---- stages ----------------------------------------------------------------------------------

    def _start_judging(self, chunk: _Chunk, batch) -> None:
        self.counters.add(generator=sum(len(r.token_ids) for r in batch.results))
        items, local, local_at = [], [], []
        for p, record in enumerate(chunk.records):
            responses = batch.results[p * self.n : (p + 1) * self.n]
            texts = [response_text(self.tokenizer, r) for r in responses]
            chunk.responses.append(responses)
            chunk.texts.append(texts)
            if not self.k:  # no judge (SPIN): generation is the last stage
                chunk.scored.append(ScoredPrompt(record, responses, texts, [None] * len(responses),
                                                 version=chunk.version))
                continue
            name = verifiers.named(record.metadata) or self.default_verifier
            for j, (resp, text) in enumerate(zip(responses, texts)):
                if resp.finish_reason == "stop":
                    seeds = tuple(derive_seed(self.seed, self.iteration, record.index, j, e, "judge")
                                  for e in range(self.k))
                    item = JudgeItem(record.user_text, text, seeds, record.last_user_text, verifier=name,
                                     metadata=record.metadata if name else None)
                    if name and self.local_verifiers is not None:
                        local_at.append(len(items) + len(local))
                        local.append(item)
                    else:
                        items.append(item)
        if not self.k:
            chunk.result = chunk.scored
            return
        if local:
            chunk.verified = dict(zip(local_at, self.local_verifiers.judge(local).judgements))
        if items:
            self._issue(chunk, _Call("judge", self.judges, self._next_judge(), (items,), version=chunk.version))
        else:  # every response was verifier-scored here: nothing for the judge pool
            self._collect_judgements(chunk, JudgeBatch([], 0))

    def _collect_judgements(self, chunk: _Chunk, batch) -> None:
        self.counters.add(judge=batch.generated_tokens)
        self.counters.add_backend(batch.backend_stats)
        judged, at = iter(batch.judgements), 0
        for record, responses, texts in zip(chunk.records, chunk.responses, chunk.texts):
            judgements: list[Judgement | None] = []
            for r in responses:
                if r.finish_reason != "stop":
                    judgements.append(None)
                    continue
                judgements.append(chunk.verified[at] if at in chunk.verified else next(judged))
                at += 1
            chunk.scored.append(ScoredPrompt(record, responses, texts, judgements, version=chunk.version))
        if not self.meta_judge or not self._start_meta(chunk):
            chunk.result = chunk.scored

    def _start_meta(self, chunk: _Chunk) -> bool:
        """Ask the judge pool to compare the judgements of each prompt's most disputed response."""
        items = []
        for p, scored in enumerate(chunk.scored):
            # SPEC 4.1: responses with verifier rewards are not the meta-judge's to compare.
            scores = [j.scores if j and j.verifier is None else [] for j in scored.judgements]
            candidate = meta.choose_candidate(scores)
            if candidate is None:
                continue
            texts = scored.judgements[candidate].texts
            distinct = [i for i, t in enumerate(texts) if t not in texts[:i]]
            if len(distinct) < 2:
                continue
            orders = meta.comparisons(len(distinct))
            chunk.meta_plan.append((p, candidate, distinct, orders))
            r = scored.record
            for a, b in orders:
                items.append(MetaItem(
                    r.user_text, scored.texts[candidate],
                    meta.strip_score(texts[distinct[a]], self.score_regex, self.score_match),
                    meta.strip_score(texts[distinct[b]], self.score_regex, self.score_match),
                    derive_seed(self.seed, self.iteration, r.index, candidate, a, b, "meta")))
        if not items:
            return False
        self._issue(chunk, _Call("meta_judge", self.judges, self._next_judge(), (items,), version=chunk.version))
        return True

    def _collect_meta(self, chunk: _Chunk, batch) -> None:
        self.counters.add(judge=batch.generated_tokens)
        self.counters.add_backend(batch.backend_stats)
        self.counters.meta_too_long += batch.too_long
        answers = iter(zip(batch.verdicts, batch.texts))
        for p, candidate, distinct, orders in chunk.meta_plan:
            got = {order: next(answers) for order in orders}
            chunk.scored[p].meta = MetaJudged(candidate, distinct, {o: v for o, (v, _) in got.items()},
                                              {o: t for o, (_, t) in got.items()})
        chunk.result = chunk.scored
