"""Self-Rewarding (SPEC section 3) and Meta-Rewarding (section 4): M_t generates, M_t judges (and with the
meta-judge, judges its own judgements), M_{t+1} is trained on the pairs."""

from __future__ import annotations

import math
from statistics import fmean
from typing import Callable

from actors.judges.protocol import FIXED
from actors.judges.verifier import VerifierJudge
from actors.verifiers import NO_VERIFIER
from learner.types import TrainSample

from ..batching import LLM_SOURCE, Batch, OutcomeStats, PromptOutcome
from ..config import per_iteration
from ..errors import WrongWeightVersion
from .. import judge_metrics, meta
from ..pairs import Candidate, select_pair
from ..rollout import RolloutPipeline, ScoredPrompt
from .iterative import WATCH_AFTER_PROMPTS, IterationSummary, IterativeAlgorithm

PARSE_ALARM = 0.5  # warn when fewer judgements than this share give a score
JUDGE_ADVICE = ("try a judge that can score (another judge.backend), a shorter judge.template, more "
                "judge.sampling.max_new_tokens (the score comes last), or a judge.reward_regex that matches what "
                "it writes")
NO_VERIFIER_ADVICE = ("judge.backend=verifier scores only samples whose metadata names a verifier (key 'verifier'): "
                      "name one in the data, or set judge.default_verifier")


def source_metrics(sources: dict) -> dict:
    """scored_by/<source>/* per scoring source (the LLM judge, each verifier): responses it was given, the share
    it scored, and its scores' mean, spread and shares at the top and bottom of the judge's scale."""
    out = {}
    for source, c in sorted(sources.items()):
        key = f"scored_by/{source}"
        out[f"{key}/responses"] = c["responses"]
        out[f"{key}/scored_rate"] = c["scored"] / c["responses"] if c["responses"] else 0.0
        if c["scored"]:
            mean = c["score_sum"] / c["scored"]
            out[f"{key}/score_mean"] = mean
            out[f"{key}/score_std"] = math.sqrt(max(0.0, c["score_sq"] / c["scored"] - mean * mean))
            out[f"{key}/top_share"] = c["top"] / c["scored"]
            out[f"{key}/bottom_share"] = c["bottom"] / c["scored"]
    return out


def remote_judge_metrics(backend: str, stats: dict) -> dict:
    """A remote judge's transport metrics since the last step, beside the judge's own (judge/<backend>/...):
    requests answered, retries, failed tries by kind (timeouts, unavailable, malformed) and in all
    (failures), requests that used up their retries (failed_requests), and the mean and largest latency of
    one request to the server. Empty for a judge without a remote engine (judge.backend=triton has one)."""
    if not any(k.startswith("remote_") for k in stats):
        return {}
    get = lambda key: stats.get(f"remote_{key}", 0.0)  # noqa: E731
    out = {f"judge/{backend}/{key}": get(key) for key in ("requests", "retries", "timeouts", "unavailable",
                                                          "malformed")}
    out[f"judge/{backend}/failures"] = get("timeouts") + get("unavailable") + get("malformed")
    out[f"judge/{backend}/failed_requests"] = get("failed")
    if get("requests"):
        out[f"judge/{backend}/request_latency_s"] = get("latency_s") / get("requests")
        out[f"judge/{backend}/request_latency_max_s"] = get("latency_max_s")
    return out


class SelfRewarding(IterativeAlgorithm):
    def _iteration(self, summary: IterationSummary, state: dict | None) -> None:
        if summary.iteration == 0 and self.cfg.algorithm.first_iteration_sft:
            self._sft_iteration(summary, state)
        else:
            if state is None and self.cfg.algorithm.use_meta_judge:
                # counting starts here (a resumed iteration has its count; an old checkpoint's stays None)
                summary.judge_pair_batches = 0
            # per iteration: the judge changes, so does the balance of its score classes
            self._balance = meta.ScoreClassBalance(self.cfg.algorithm.meta_max_relative_pcnt)
            if state:
                self._balance.counts.update({float(k): v for k, v in state["extra"]["score_classes"].items()})
            self._streaming_iteration(summary, state)

    def _extra_state(self) -> dict:
        balance = getattr(self, "_balance", None)
        return {"score_classes": {str(k): v for k, v in balance.counts.items()} if balance else {}}

    def _pipeline(self, iteration: int, skip: int) -> RolloutPipeline:
        a = self.cfg.algorithm
        return RolloutPipeline(
            self.pools.generators, self.pools.judges, self._records(iteration, skip), tokenizer=self.ctx.tokenizer,
            sampling=self.sampling, num_responses=a.num_responses_to_gen, num_evals=a.num_evals_to_average,
            chunk_size=a.rollout_batch_size, seed=self.cfg.seed, iteration=iteration, meta_judge=a.use_meta_judge,
            score_regex=self.cfg.judge.reward_regex, score_match=self.cfg.judge.score_match,
            local_verifiers=self._local_verifiers(), default_verifier=self.cfg.judge.default_verifier)

    def _local_verifiers(self) -> VerifierJudge | None:
        """What scores verifier-named samples here, beside an LLM judge; None when the judge pool is the verifier."""
        if self.cfg.judge.backend == "verifier":
            return None
        return VerifierJudge(self.cfg.judge.score_low, self.cfg.judge.score_high)

    def _judgement_rows(self, scored: ScoredPrompt) -> list[list]:
        """Each judgement of the prompt's first judged response, then its meta-judgements."""
        rows = []
        for text, j in zip(scored.texts, scored.judgements):
            if j is not None:
                kind = "judge" if j.verifier is None else "verifier"
                rows += [[kind, scored.record.user_text, text, t, score] for t, score in zip(j.texts, j.scores)]
                break
        if scored.meta is not None:
            shown = scored.texts[scored.meta.response]
            rows += [["meta", scored.record.user_text, shown, t, scored.meta.verdicts[order]]
                     for order, t in scored.meta.texts.items()]
        return rows

    def _watch(self, summary: IterationSummary) -> None:
        super()._watch(summary)
        s = summary.stats
        if s.judgements >= WATCH_AFTER_PROMPTS and s.valid_judgements / s.judgements < PARSE_ALARM:
            self._warn_once(summary, "parse", f"[iteration {summary.iteration}] WARNING: only "
                            f"{s.valid_judgements} of {s.judgements} judgements so far gave a score "
                            f"(judge.reward_regex in [judge.score_low, judge.score_high]): {JUDGE_ADVICE}. "
                            f"What the judge writes: {self.cfg.output_dir}/table_judgements.jsonl")
        unnamed = s.sources.get(NO_VERIFIER, {}).get("responses", 0)
        if unnamed and s.prompts >= WATCH_AFTER_PROMPTS:
            self._warn_once(summary, "unnamed", f"[iteration {summary.iteration}] WARNING: {unnamed} responses so far "
                            f"get no score: {NO_VERIFIER_ADVICE}")

    def _why_nothing_trained(self, summary: IterationSummary) -> str:
        s = summary.stats
        why = []
        if s.responses and s.unended / s.responses > 0.5:
            why.append(f"{s.unended} of {s.responses} responses did not end before algorithm.sampling.max_new_tokens="
                       f"{self.cfg.algorithm.sampling.max_new_tokens} (only ended ones are judged): raise it, or add "
                       "the model's end-of-turn marker to algorithm.sampling.stop_strings")
        if s.judgements:
            why.append(f"the judge gave a score in {s.valid_judgements} of {s.judgements} judgements "
                       f"({s.valid_judgements / s.judgements:.0%}); a prompt needs two responses with different mean "
                       f"scores: {JUDGE_ADVICE}")
        verified = {k: c for k, c in s.sources.items() if k not in (LLM_SOURCE, NO_VERIFIER)}
        if verified:
            what = ", ".join(f"{k} {c['responses']} (mean {c['score_sum'] / c['scored']:.2f})" if c["scored"] else
                             f"{k} {c['responses']} (none decided)" for k, c in sorted(verified.items()))
            why.append(f"verifiers scored responses: {what}; a prompt whose responses all pass or all fail its verifier "
                       "gives no pair")
        if s.sources.get(NO_VERIFIER):
            why.append(f"{s.sources[NO_VERIFIER]['responses']} responses got no score: {NO_VERIFIER_ADVICE}")
        return "; ".join(why)

    def _judge_pair_cap(self) -> int:
        a = self.cfg.algorithm
        return round(a.meta_judge_pcnt * a.global_batch_size) if a.use_meta_judge else 0

    def _outcomes(self, scored: ScoredPrompt, summary: IterationSummary) -> list[PromptOutcome]:
        rho = per_iteration(self.cfg.algorithm.length_control, summary.iteration)
        # Every response, and every judgement of a judge that follows the policy, comes from the prompt's
        # version: M_t of the iteration, or with streaming refits the version its chunk was scheduled at; a
        # fixed judge's judgements, and every verifier's, say so.
        version = self.version if scored.version is None else scored.version
        judge_version = version if self.pools.judges.follows_policy else FIXED
        judged = [j for j in scored.judgements if j and j.verifier is None]
        verified = [j for j in scored.judgements if j and j.verifier is not None]
        versions = ({("response", r.weight_version) for r in scored.responses}
                    | {("judgement", j.weight_version) for j in judged} | {("verifier", j.weight_version) for j in verified})
        expected = ({("response", version)} | ({("judgement", judge_version)} if judged else set())
                    | ({("verifier", FIXED)} if verified else set()))
        if versions != expected:
            raise WrongWeightVersion(f"prompt {scored.record.index} was served by weight versions "
                                     f"{sorted(versions, key=str)}, expected {sorted(expected, key=str)}")
        candidates = [Candidate(tuple(r.token_ids), r.finish_reason == "stop",
                                j.mean if j else None, j.variance if j else None)
                      for r, j in zip(scored.responses, scored.judgements)]
        selection = select_pair(candidates, rho)
        stats = OutcomeStats(prompts=1, responses=len(candidates),
                             unended=sum(not c.ended for c in candidates), bad_samples=int(not selection.is_pair))
        oracle: Callable | None = self.ctx.evaluator.judge_truth if self.ctx.evaluator else None
        for text, j in zip(scored.texts, scored.judgements):
            if j is None:
                continue
            stats.judged_responses += 1
            stats.count_source(j.verifier or LLM_SOURCE, j.mean, self.cfg.judge.score_low, self.cfg.judge.score_high)
            if j.verifier is None or self.cfg.judge.backend == "verifier":  # the judge backend's own judgements
                judge_metrics.count_scores(stats.judge_scores, j.scores, self.cfg.judge.score_low,
                                           self.cfg.judge.score_high)
            if j.verifier is not None:  # a rule's reward: none of the LLM judge's counts below
                continue
            stats.judge_shortened += j.shortened
            stats.judge_trimmed += j.trimmed
            stats.judge_too_long += j.too_long
            stats.judgements += len(j.scores)
            stats.valid_judgements += len(j.valid)
            stats.judge_top_scores += sum(score == self.cfg.judge.score_high for score in j.valid)
            truth = oracle(scored.record.metadata, text) if oracle else None
            if truth is not None:
                stats.judge_checked += len(j.valid)
                stats.judge_correct += sum(s == truth for s in j.valid)
        judge_sample = self._judge_pair(scored, stats)
        summary.stats += stats
        outcome = PromptOutcome(stats, epoch=scored.record.epoch, prompt_text=scored.record.user_text,
                                reason=selection.reason, judge_sample=judge_sample, version=version)
        if selection.is_pair:
            c, r = selection.chosen, selection.rejected
            outcome.sample = TrainSample(scored.record.prompt_ids, list(candidates[c].token_ids),
                                         list(candidates[r].token_ids), candidates[c].mean, candidates[r].mean)
            outcome.chosen_text, outcome.rejected_text = scored.texts[c], scored.texts[r]
            summary.chosen_scores.append(candidates[c].mean)
            summary.rejected_scores.append(candidates[r].mean)
        return [outcome]

    def _judge_pair(self, scored: ScoredPrompt, stats: OutcomeStats) -> TrainSample | None:
        """Meta-Rewarding: the judge pair of this prompt (SPEC 4.3-4.4), or None."""
        m = scored.meta
        if m is None:
            return None
        stats.meta_verdicts += len(m.verdicts)
        stats.meta_valid_verdicts += sum(v is not None for v in m.verdicts.values())
        j = scored.judgements[m.response]
        texts = [j.texts[i] for i in m.judgements]
        scores = [j.scores[i] for i in m.judgements]
        choice = meta.choose_judge_pair(texts, scores, meta.win_counts(len(texts), m.verdicts))
        if choice.chosen is None or not self._balance.admit(scores[choice.chosen]):
            return None
        stats.judge_pairs += 1
        chosen, rejected = m.judgements[choice.chosen], m.judgements[choice.rejected]
        oracle = self.ctx.evaluator.judge_truth if self.ctx.evaluator else None
        truth = oracle(scored.record.metadata, scored.texts[m.response]) if oracle else None
        if truth is not None:  # toy world: is the meta-judge's choice the judgement nearer the true score?
            stats.judge_pairs_checked += 1
            stats.judge_pairs_right += abs(j.scores[chosen] - truth) < abs(j.scores[rejected] - truth)
        return TrainSample(list(j.prompt_ids), list(j.token_ids[chosen]), list(j.token_ids[rejected]),
                           j.scores[chosen], j.scores[rejected])

    def _step_metrics(self, batch: Batch, pipeline: RolloutPipeline) -> dict:
        s = batch.stats
        samples = [o.sample for o in batch.outcomes]  # actor pairs: their judge scores are the generated rewards
        llm_judged = max(1, s.sources.get(LLM_SOURCE, {}).get("responses", 0))
        out = {
            "bad_samples_per_GBS": s.bad_samples / s.prompts,
            "judge_parse_rate": s.valid_judgements / s.judgements if s.judgements else 0.0,
            "judge_prompts_shortened": s.judge_shortened / llm_judged,
            "judge_responses_trimmed": s.judge_trimmed / llm_judged,
            "judge_too_long": s.judge_too_long / llm_judged,
            "meta_pairs_per_GBS": len(batch.judge_samples) / len(batch.samples),
            "meta_comparisons": s.meta_verdicts,
            "meta_judge_parse_rate": s.meta_valid_verdicts / s.meta_verdicts if s.meta_verdicts else 0.0,
            "meta_prompts_too_long": pipeline.counters.meta_too_long,
            "length_control": per_iteration(self.cfg.algorithm.length_control, self.summaries[-1].iteration),
            "chosen_generated_rewards": fmean(x.chosen_score for x in samples),
            "rejected_generated_rewards": fmean(x.rejected_score for x in samples),
        }
        if s.valid_judgements:  # no valid judgement among the batch's prompts: no share to show
            out["judge_top_score_share"] = s.judge_top_scores / s.valid_judgements
        out.update(remote_judge_metrics(self.cfg.judge.backend, pipeline.counters.take_backend()))
        out.update(source_metrics(s.sources))
        backend = self.cfg.judge.backend
        out.update(judge_metrics.score_metrics(backend, s.judge_scores))
        out.update(pipeline.latency["judge"].take(backend))
        out.update(pipeline.latency["meta_judge"].take(backend, "meta_"))
        return out
