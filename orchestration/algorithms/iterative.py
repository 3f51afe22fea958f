"""The loop Self-Rewarding and SPIN share: iterations of "M_t makes data, train M_{t+1} on it".

Inside an iteration the pools hold M_t, which is fixed, so generation (and judging) of later prompts runs
while the learner steps on earlier pairs at no staleness cost. At the boundary the reference becomes the
trained weights and every engine is refit to them. A subclass says how prompts become records, which
pipeline stages run, and how a scored prompt becomes pairs.
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
from typing import Iterator

import ray

from learner.types import LossConfig, TrainSample

from ..batching import Batch, GlobalBatcher, OutcomeStats, PromptOutcome
from ..cluster import Pools, refit
from ..config import Config, limited, per_iteration, sampling_params
from ..context import RunContext
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
            "judge_pairs": s.judge_pairs if s.judgements else None,
            "pairs_trained": self.pairs_trained,
            "unused_pairs": self.unused_pairs,
            "steps": self.steps,
            "pairs_per_s": self.pairs_trained / self.seconds if self.seconds else None,
            "val_loss": self.val_loss,
            "checkpoint": self.checkpoint,
        }


class IterativeAlgorithm:
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

    # ---- what a subclass provides ----------------------------------------------------------------------

    def _iteration(self, summary: IterationSummary) -> None:
        """Train one iteration (the default: stream pairs from the pipeline into exact batches)."""
        self._streaming_iteration(summary)

    def _pipeline(self, iteration: int) -> RolloutPipeline:
        raise NotImplementedError

    def _outcomes(self, scored: ScoredPrompt, summary: IterationSummary) -> list[PromptOutcome]:
        """What one scored prompt contributes to the batches, in order."""
        raise NotImplementedError

    def _step_metrics(self, batch: Batch, pipeline: RolloutPipeline) -> dict:
        """Algorithm-specific train/ metrics of a step (without the prefix)."""
        return {}

    def _judge_pair_cap(self) -> int:
        return 0

    def _end_iteration(self, summary: IterationSummary) -> None:
        """Called after an iteration's last step, before its checkpoint."""

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
            self._iteration(summary)
            summary.seconds = time.perf_counter() - start
            self._end_iteration(summary)
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

    def _streaming_iteration(self, summary: IterationSummary) -> None:
        """Prompts flow through the pipeline into exact global batches; one learner step runs at a time
        while later prompts are generated."""
        a = self.cfg.algorithm
        it = summary.iteration
        loss_cfg = self._loss_config(it)
        pipeline = self._pipeline(it)
        batcher = self._batcher = GlobalBatcher(a.global_batch_size, judge_pair_cap=self._judge_pair_cap())
        in_training: tuple[list, Batch, float] | None = None
        last_log = time.perf_counter()
        while True:
            while (not self._steps_exhausted() and
                   pipeline.prompts_in_flight + max(0, batcher.buffered_pairs - a.global_batch_size)
                   < a.max_prompts_ahead):
                if not pipeline.submit_next():
                    break
            for scored in pipeline.pop_ready():
                for outcome in self._outcomes(scored, summary):
                    batcher.add(outcome)
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
                    self._log_step(metrics, batch, summary, now - started, now - last_log, pipeline, loss_cfg)
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
        """Plain supervised fine-tuning on the ground-truth answers (Self-Rewarding's first_iteration_sft)."""
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

    def _records(self, iteration: int, with_answers: bool = False) -> Iterator[PromptRecord]:
        """The iteration's prompts, epoch after epoch; too-long prompts are skipped (the context counts them)."""
        for epoch in range(self.cfg.algorithm.max_epochs):
            for index in self._order(iteration, epoch):
                conv = self.ctx.train[index]
                encoded = self.ctx.encode(conv)
                if encoded is None:
                    continue
                yield PromptRecord(index, epoch, encoded.prompt_ids, self.ctx.user_text(encoded.prompt_messages),
                                   self.ctx.last_user_text(encoded.prompt_messages), conv.metadata,
                                   encoded.answer_ids if with_answers else None)

    def _log_step(self, metrics: dict, batch: Batch, summary: IterationSummary, step_time: float,
                  window: float, pipeline: RolloutPipeline, loss_cfg: LossConfig) -> None:
        self.step += 1
        self.consumed += len(batch.samples)
        summary.steps += 1
        summary.pairs_trained += len(batch.samples)
        s = batch.stats
        gen_tokens, judge_tokens = pipeline.counters.take()
        row = {f"train/{k}": v for k, v in metrics.items()}
        row.update({f"train/{k}": v for k, v in self._step_metrics(batch, pipeline).items()})
        row.update({
            "train/bad_ends_per_GBS": s.unended / max(1, s.responses),
            "train/consumed_samples": self.consumed,
            "train/step_time": step_time,
            "train/epoch": batch.outcomes[-1].epoch,
            "train/iteration": summary.iteration,
            "train/beta": loss_cfg.beta,
            "train/generator_tokens_per_s": gen_tokens / window,
            "train/pairs_per_s": len(batch.samples) / window,
        })
        if self.pools.judges:
            row["train/judge_tokens_per_s"] = judge_tokens / window
        self._emit(row)

    def _emit(self, row: dict) -> None:
        self.ctx.metrics.log(row, self.step)
        keys = ("loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean", "bad_samples_per_GBS",
                "bad_valids_per_GBS", "judge_parse_rate", "pairs_per_s")
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
