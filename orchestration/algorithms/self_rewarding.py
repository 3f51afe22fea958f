"""Self-Rewarding (SPEC section 3): M_t generates, M_t judges, M_{t+1} is trained on the pairs.

Inside an iteration the pools hold M_t, which is fixed, so generation of later prompts runs while the
learner steps on earlier pairs at no staleness cost. At the boundary the reference becomes the trained
weights and both pools are refit to them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Callable, Iterator

import ray

from learner.types import LossConfig, TrainSample

from ..batching import Batch, GlobalBatcher, OutcomeStats, PromptOutcome
from ..cluster import Pools, refit
from ..config import Config, limited, per_iteration, sampling_params
from ..context import RunContext
from .. import meta
from ..pairs import Candidate, select_pair
from ..rollout import PromptRecord, RolloutPipeline, ScoredPrompt

BUCKET_BYTES = 256 << 20
GENERATION_TABLE_COLUMNS = ("step", "prompt", "chosen", "rejected", "chosen_score", "rejected_score")
GENERATION_TABLE_ROWS = 4  # pairs of the latest batch shown at each validation


@dataclass
class IterationSummary:
    iteration: int
    task_accuracy: float | None = None  # of M_t, greedy on held-out prompts (toy world only)
    stats: OutcomeStats = field(default_factory=OutcomeStats)
    chosen_scores: list[float] = field(default_factory=list)
    rejected_scores: list[float] = field(default_factory=list)
    pairs_trained: int = 0
    steps: int = 0
    unused_pairs: int = 0
    seconds: float = 0.0
    val_loss: float | None = None
    checkpoint: str = ""

    def row(self) -> dict:
        s = self.stats
        return {
            "iteration": self.iteration,
            "task_accuracy": self.task_accuracy,
            "judge_parse_rate": s.valid_judgements / s.judgements if s.judgements else None,
            "judge_accuracy": s.judge_correct / s.judge_checked if s.judge_checked else None,
            "chosen_score": fmean(self.chosen_scores) if self.chosen_scores else None,
            "rejected_score": fmean(self.rejected_scores) if self.rejected_scores else None,
            "bad_sample_rate": s.bad_samples / s.prompts if s.prompts else None,
            "judge_pairs": s.judge_pairs,
            "pairs_trained": self.pairs_trained,
            "unused_pairs": self.unused_pairs,
            "steps": self.steps,
            "pairs_per_s": self.pairs_trained / self.seconds if self.seconds else None,
            "val_loss": self.val_loss,
            "checkpoint": self.checkpoint,
        }


class SelfRewarding:
    def __init__(self, cfg: Config, ctx: RunContext, pools: Pools):
        self.cfg, self.ctx, self.pools = cfg, ctx, pools
        self.sampling = sampling_params(cfg.algorithm.sampling)
        self.step = 0  # optimizer steps over the whole run
        self.consumed = 0  # pairs (or SFT samples) trained on over the whole run
        self.version = 0  # weight version the pools serve
        self.summaries: list[IterationSummary] = []
        self._last_batch: Batch | None = None  # for the generations table
        self._validated_at, self._val_loss = -1, None
        self._batcher: GlobalBatcher | None = None  # the current iteration's (its waiting judge pairs are state)

    # ---- the run -------------------------------------------------------------------------------------

    def run(self) -> list[IterationSummary]:
        a = self.cfg.algorithm
        for it in range(a.max_iterations):
            summary = IterationSummary(it)
            self.summaries.append(summary)
            self._last_batch = None
            if self.ctx.evaluator is not None:
                summary.task_accuracy = self.ctx.evaluator.task_accuracy(self.pools.generators)
            start = time.perf_counter()
            if it == 0 and a.first_iteration_sft:
                self._sft_iteration(summary)
            else:
                self._preference_iteration(summary)
            summary.seconds = time.perf_counter() - start
            summary.val_loss = self._validate(self._last_batch)
            path = Path(self.cfg.output_dir) / "checkpoints" / f"iter_{it}"
            self.pools.learner.save(str(path))
            summary.checkpoint = str(path)
            self.ctx.log(f"[iteration {it}] done: {summary.steps} steps, {summary.pairs_trained} pairs, "
                         f"checkpoint {path}")
            # Iteration boundary: M_{t+1} becomes the reference and what the pools serve.
            self.pools.learner.update_reference()
            if a.reset_optimizer_each_iteration:
                self.pools.learner.reset_optimizer()
            self.version += 1
            refit(self.pools, self.version, BUCKET_BYTES)
            if self._steps_exhausted():
                self.ctx.log(f"[run] algorithm.max_steps={a.max_steps} reached")
                break
        if self.ctx.evaluator is not None:
            final = IterationSummary(len(self.summaries))
            final.task_accuracy = self.ctx.evaluator.task_accuracy(self.pools.generators)
            self.summaries.append(final)
        return self.summaries

    # ---- iterations -----------------------------------------------------------------------------------

    def _preference_iteration(self, summary: IterationSummary) -> None:
        a = self.cfg.algorithm
        it = summary.iteration
        loss_cfg = self._loss_config(it)
        rho = per_iteration(a.length_control, it)
        pipeline = RolloutPipeline(
            self.pools.generators, self.pools.judges, self._records(it), tokenizer=self.ctx.tokenizer,
            sampling=self.sampling, num_responses=a.num_responses_to_gen, num_evals=a.num_evals_to_average,
            chunk_size=a.rollout_batch_size, seed=self.cfg.seed, iteration=it,
            meta_reward_regex=self.cfg.judge.reward_regex if a.use_meta_judge else None)
        cap = round(a.meta_judge_pcnt * a.global_batch_size) if a.use_meta_judge else 0
        batcher = self._batcher = GlobalBatcher(a.global_batch_size, judge_pair_cap=cap)
        self._balance = meta.ScoreClassBalance(a.meta_max_relative_pcnt)  # per iteration: the judge changes
        in_training: tuple[list, Batch, float] | None = None
        last_log = time.perf_counter()
        while True:
            while (not self._steps_exhausted() and
                   pipeline.prompts_in_flight + max(0, batcher.buffered_pairs - a.global_batch_size)
                   < a.max_prompts_ahead):
                if not pipeline.submit_next():
                    break
            for scored in pipeline.pop_ready():
                batcher.add(self._outcome(scored, summary, rho))
            if in_training is None and batcher.ready() and not self._steps_exhausted():
                batch = batcher.pop()
                in_training = (self.pools.learner.train_step_async(batch.samples, loss_cfg), batch,
                               time.perf_counter())
            waitables = (pipeline.pending() if not self._steps_exhausted() else []) + \
                        (in_training[0] if in_training else [])
            if not waitables:
                break
            ready, _ = ray.wait(waitables, num_returns=1)
            pipeline.advance(set(ready))
            if in_training is not None:
                refs, batch, started = in_training
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                if len(done) == len(refs):
                    metrics = ray.get(refs)[0]
                    now = time.perf_counter()
                    self._log_step(metrics, batch, summary, now - started, now - last_log, pipeline, loss_cfg, rho)
                    self._last_batch = batch
                    self._after_step(batch)
                    last_log = now
                    in_training = None
        leftover, judge_left = batcher.drain()
        summary.unused_pairs = sum(o.sample is not None for o in leftover) + len(judge_left)
        self.ctx.metrics.log({"train/unused_pairs": summary.unused_pairs, "train/iteration": it}, self.step)
        if summary.unused_pairs:
            self.ctx.log(f"[iteration {it}] {summary.unused_pairs} pairs left over (fewer than "
                         f"global_batch_size={a.global_batch_size}) are not trained on")

    def _sft_iteration(self, summary: IterationSummary) -> None:
        """first_iteration_sft: plain supervised fine-tuning on the ground-truth answers."""
        a = self.cfg.algorithm
        loss_cfg = LossConfig(sft_loss_weight=1.0, preference_loss_weight=0.0,
                              sft_average_log_probs=a.sft_average_log_probs)
        buffer: list[TrainSample] = []
        for epoch in range(a.max_epochs):
            for index in self._order(summary.iteration, epoch):
                if self._steps_exhausted():
                    break
                encoded = self.ctx.encode(self.ctx.train[index])
                if encoded is None or encoded.answer_ids is None:
                    continue
                buffer.append(TrainSample(encoded.prompt_ids, encoded.answer_ids))
                if len(buffer) == a.global_batch_size:
                    start = time.perf_counter()
                    metrics = ray.get(self.pools.learner.train_step_async(buffer, loss_cfg))[0]
                    self.step += 1
                    self.consumed += len(buffer)
                    summary.steps += 1
                    summary.pairs_trained += len(buffer)
                    self._emit({**{f"train/{k}": v for k, v in metrics.items()},
                                "train/step_time": time.perf_counter() - start, "train/epoch": epoch,
                                "train/iteration": summary.iteration, "train/consumed_samples": self.consumed})
                    self._after_step(None)
                    buffer = []
        summary.unused_pairs = len(buffer)
        self.ctx.metrics.log({"train/unused_pairs": summary.unused_pairs, "train/iteration": summary.iteration},
                             self.step)

    # ---- pieces -----------------------------------------------------------------------------------------

    def _order(self, iteration: int, epoch: int) -> list[int]:
        """This epoch's prompt order, cut to algorithm.limit_train_batches."""
        a = self.cfg.algorithm
        order = list(range(len(self.ctx.train)))
        random.Random(f"{self.cfg.seed}/{iteration}/{epoch}").shuffle(order)
        return order[: limited(len(order), a.limit_train_batches, a.global_batch_size)]

    def _records(self, iteration: int) -> Iterator[PromptRecord]:
        for epoch in range(self.cfg.algorithm.max_epochs):
            for index in self._order(iteration, epoch):
                conv = self.ctx.train[index]
                encoded = self.ctx.encode(conv)
                if encoded is None:
                    continue  # too long: counted by the context
                yield PromptRecord(index, epoch, encoded.prompt_ids, self.ctx.user_text(encoded.prompt_messages),
                                   self.ctx.last_user_text(encoded.prompt_messages), conv.metadata)

    def _outcome(self, scored: ScoredPrompt, summary: IterationSummary, rho: float) -> PromptOutcome:
        a = self.cfg.algorithm
        versions = {r.weight_version for r in scored.responses} | {j.weight_version for j in scored.judgements if j}
        if versions != {self.version}:  # inside an iteration everything must come from M_t
            raise RuntimeError(f"prompt {scored.record.index} was served by weight versions {sorted(versions)}, "
                               f"expected {self.version}")
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
            stats.judge_shortened += j.shortened
            stats.judge_trimmed += j.trimmed
            stats.judge_too_long += j.too_long
            stats.judgements += len(j.scores)
            stats.valid_judgements += len(j.valid)
            truth = oracle(scored.record.metadata, text) if oracle else None
            if truth is not None:
                stats.judge_checked += len(j.valid)
                stats.judge_correct += sum(s == truth for s in j.valid)
        judge_sample = self._judge_pair(scored, stats)
        summary.stats += stats
        outcome = PromptOutcome(stats, epoch=scored.record.epoch, prompt_text=scored.record.user_text,
                                reason=selection.reason, judge_sample=judge_sample)
        if selection.is_pair:
            c, r = selection.chosen, selection.rejected
            outcome.sample = TrainSample(scored.record.prompt_ids, list(candidates[c].token_ids),
                                         list(candidates[r].token_ids), candidates[c].mean, candidates[r].mean)
            outcome.chosen_text, outcome.rejected_text = scored.texts[c], scored.texts[r]
            summary.chosen_scores.append(candidates[c].mean)
            summary.rejected_scores.append(candidates[r].mean)
        return outcome

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
        return TrainSample(list(j.prompt_ids), list(j.token_ids[chosen]), list(j.token_ids[rejected]),
                           j.scores[chosen], j.scores[rejected])

    def _log_step(self, metrics: dict, batch: Batch, summary: IterationSummary, step_time: float,
                  window: float, pipeline: RolloutPipeline, loss_cfg: LossConfig, rho: float) -> None:
        self.step += 1
        self.consumed += len(batch.samples)
        summary.steps += 1
        summary.pairs_trained += len(batch.samples)
        s = batch.stats
        gen_tokens, judge_tokens = pipeline.counters.take()
        samples = [o.sample for o in batch.outcomes]  # actor pairs: their judge scores are the generated rewards
        row = {f"train/{k}": v for k, v in metrics.items()}
        row.update({
            "train/bad_samples_per_GBS": s.bad_samples / s.prompts,
            "train/bad_ends_per_GBS": s.unended / s.responses,
            "train/judge_parse_rate": s.valid_judgements / s.judgements if s.judgements else 0.0,
            "train/judge_prompts_shortened": s.judge_shortened / max(1, s.judged_responses),
            "train/judge_responses_trimmed": s.judge_trimmed / max(1, s.judged_responses),
            "train/judge_too_long": s.judge_too_long / max(1, s.judged_responses),
            "train/meta_pairs_per_GBS": len(batch.judge_samples) / len(batch.samples),
            "train/meta_comparisons": s.meta_verdicts,
            "train/meta_judge_parse_rate": s.meta_valid_verdicts / s.meta_verdicts if s.meta_verdicts else 0.0,
            "train/meta_prompts_too_long": pipeline.counters.meta_too_long,
            "train/length_control": rho,
            "train/chosen_generated_rewards": fmean(x.chosen_score for x in samples),
            "train/rejected_generated_rewards": fmean(x.rejected_score for x in samples),
            "train/consumed_samples": self.consumed,
            "train/step_time": step_time,
            "train/epoch": batch.outcomes[-1].epoch,
            "train/iteration": summary.iteration,
            "train/beta": loss_cfg.beta,
            "train/generator_tokens_per_s": gen_tokens / window,
            "train/judge_tokens_per_s": judge_tokens / window,
            "train/pairs_per_s": len(batch.samples) / window,
        })
        self._emit(row)

    def _emit(self, row: dict) -> None:
        self.ctx.metrics.log(row, self.step)
        keys = ("loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean", "bad_samples_per_GBS",
                "judge_parse_rate", "pairs_per_s")
        shown = " ".join(f"{k}={row['train/' + k]:.4g}" for k in keys if f"train/{k}" in row)
        self.ctx.log(f"[step {self.step} | iter {row['train/iteration']}] {shown}")

    def _loss_config(self, iteration: int) -> LossConfig:
        a = self.cfg.algorithm
        return LossConfig(preference_loss=a.preference_loss, beta=per_iteration(a.ref_policy_kl_penalty, iteration),
                          gt_reward_scale=a.gt_reward_scale,
                          preference_loss_weight=a.preference_loss_weight, sft_loss_weight=a.sft_loss_weight,
                          preference_average_log_probs=a.preference_average_log_probs,
                          sft_average_log_probs=a.sft_average_log_probs)

    def _validate(self, batch: Batch | None = None) -> float | None:
        """val/loss on the validation answers, and the latest batch's pairs as `table/train_generations`."""
        if self._validated_at == self.step:  # already done at this step (interval and iteration end met)
            return self._val_loss
        self._validated_at = self.step
        if batch is not None:
            rows = [[self.step, o.prompt_text, o.chosen_text, o.rejected_text, o.sample.chosen_score,
                     o.sample.rejected_score] for o in batch.outcomes[:GENERATION_TABLE_ROWS]]
            self.ctx.metrics.table("table/train_generations", list(GENERATION_TABLE_COLUMNS), rows, self.step)
        samples = self._val_samples()
        if not samples:
            return None
        loss = self.pools.learner.sft_nll(samples)
        self._val_loss = loss
        self.ctx.metrics.log({"val/loss": loss}, self.step)
        self.ctx.log(f"[validation] step {self.step}: val/loss={loss:.4f}")
        return loss

    @functools.cache
    def _val_samples(self) -> list[TrainSample]:
        """The validation answers, tokenised once (limit_val_batches applied)."""
        if self.ctx.val is None:
            return []
        a = self.cfg.algorithm
        samples = []
        for i in range(limited(len(self.ctx.val), a.limit_val_batches, a.global_batch_size)):
            encoded = self.ctx.encode(self.ctx.val[i])
            if encoded is not None and encoded.answer_ids is not None:
                samples.append(TrainSample(encoded.prompt_ids, encoded.answer_ids))
        return samples

    def _after_step(self, batch: Batch | None) -> None:
        """Step-interval work: validation with the generations table, and checkpoints."""
        a = self.cfg.algorithm
        if a.val_check_interval > 0 and self.step % a.val_check_interval == 0:
            self._validate(batch)
        if a.save_interval > 0 and self.step % a.save_interval == 0:
            path = Path(self.cfg.output_dir) / "checkpoints" / f"step_{self.step}"
            self.pools.learner.save(str(path))
            self._save_run_state(path)
            self.ctx.log(f"[checkpoint] step {self.step}: {path}")

    def _save_run_state(self, path: Path) -> None:
        """What the weights do not hold: counters and the judge pairs waiting for a batch (SPEC 4.6)."""
        waiting = self._batcher.waiting_judge_pairs if self._batcher is not None else []
        state = {"step": self.step, "consumed_samples": self.consumed, "weight_version": self.version,
                 "judge_pairs_waiting": [dataclasses.asdict(s) for s in waiting]}
        tmp = path / "run_state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path / "run_state.json")

    def _steps_exhausted(self) -> bool:
        cap = self.cfg.algorithm.max_steps
        return cap != -1 and self.step >= cap
