"""The loop Self-Rewarding and SPIN share: iterations of "M_t makes data, train M_{t+1} on it".

Inside an iteration the pools hold M_t, which is fixed, so generation (and judging) of later prompts runs
while the learner steps on earlier pairs at no staleness cost. At the boundary the reference becomes the
trained weights and every engine is refit to them. A subclass says how prompts become records, which
pipeline stages run, and how a scored prompt becomes pairs.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Iterator

import ray
from tqdm import tqdm

from actors.verifiers import NO_VERIFIER
from learner.types import LossConfig, TrainSample

from ..batching import LLM_SOURCE, Batch, GlobalBatcher, OutcomeStats, PromptOutcome
from ..checkpoint import Checkpoint, Checkpoints
from ..cluster import Pools, ReplicaFailed, raise_learner_failures
from ..config import Config, limited, per_iteration, sampling_params
from ..context import RunContext
from ..errors import RunFailed
from ..faults import crash_point
from ..refit import refit
from ..rollout import PromptRecord, RolloutPipeline, ScoredPrompt
from ..rollout_journal import RolloutJournal
from ..stopping import StopRequested, Stopper
from ..streaming import WEIGHTS_DIR
from .online import OnlineIterations

GENERATION_TABLE_COLUMNS = ("step", "prompt", "chosen", "rejected", "chosen_score", "rejected_score")
GENERATION_TABLE_ROWS = 4  # pairs of the latest batch shown at each validation
# What the judge wrote, as it happens: a sample of judgements (and meta-judgements) per step, also for
# iterations that train nothing (where it matters most).
JUDGEMENT_TABLE_COLUMNS = ("step", "iteration", "kind", "prompt", "response", "text", "parsed")
JUDGEMENT_TABLE_ROWS = 6
# Warn once per iteration when, after this many prompts, this share of them gave no pair.
WATCH_AFTER_PROMPTS = 32
BAD_SAMPLE_ALARM = 0.9


class NothingToTrain(RunFailed):
    """An iteration ended without a single optimizer step: the run would finish having learned nothing."""


@dataclass
class IterationSummary:
    """One iteration's counts; row() is its line in the end-of-run table (and its iter/ metrics).

    reward_agreement is the mean over the iteration's preference steps of the learner's `acc`: a tie counts
    as disagreement, so the first step (pi == pi_ref, every log-ratio 0) gives 0 and is not left out."""

    iteration: int
    task_accuracy: float | None = None  # of M_t, greedy on held-out prompts (toy world only)
    heldout_judge_accuracy: float | None = None  # of M_t as judge, on held-out probes (toy world only)
    stats: OutcomeStats = field(default_factory=OutcomeStats)
    chosen_scores: list[float] = field(default_factory=list)
    rejected_scores: list[float] = field(default_factory=list)
    pairs_trained: int = 0
    steps: int = 0
    unused_pairs: int = 0
    seconds: float = 0.0
    val_loss: float | None = None
    checkpoint: str = ""
    bad_reasons: dict[str, int] = field(default_factory=dict)  # why prompts gave no pair, with counts
    # Failure-mode watch, kept as sums and counts so a resumed iteration gives the same row (old checkpoints
    # lack them: the defaults).
    actor_pairs: int = 0  # trained actor pairs (pairs_trained also counts judge pairs)
    chosen_tokens: int = 0  # response tokens of those pairs' chosen and rejected sides: length explosion
    rejected_tokens: int = 0
    agreement_sum: float = 0.0  # sum over preference steps of the learner's `acc`
    agreement_steps: int = 0
    judge_pair_batches: int | None = None  # steps whose batch held a judge pair; None: no meta-judge
    # Streaming refits (algorithm.refit_every_steps): pairs dropped as too stale, and the lag of trained pairs.
    stale_pairs_dropped: int = 0
    lag_sum: int = 0
    lag_pairs: int = 0
    lag_max: int = 0

    def row(self) -> dict:
        s = self.stats
        # Responses scored by a verifier (a rule-based reward) rather than the LLM judge, and their mean score.
        rules = [c for k, c in s.sources.items() if k not in (LLM_SOURCE, NO_VERIFIER)]
        verified, verifier_scored = sum(c["responses"] for c in rules), sum(c["scored"] for c in rules)
        verifier_sum = sum(c["score_sum"] for c in rules)
        return {
            "iteration": self.iteration,
            "task_accuracy": self.task_accuracy,
            "heldout_judge_accuracy": self.heldout_judge_accuracy,
            "judge_parse_rate": s.valid_judgements / s.judgements if s.judgements else None,
            "judge_accuracy": s.judge_correct / s.judge_checked if s.judge_checked else None,
            "top_score_share": s.judge_top_scores / s.valid_judgements if s.valid_judgements else None,
            "chosen_score": fmean(self.chosen_scores) if self.chosen_scores else None,
            "rejected_score": fmean(self.rejected_scores) if self.rejected_scores else None,
            "chosen_length": self.chosen_tokens / self.actor_pairs if self.actor_pairs else None,
            "rejected_length": self.rejected_tokens / self.actor_pairs if self.actor_pairs else None,
            "bad_sample_rate": s.bad_samples / s.prompts if s.prompts else None,
            "reward_agreement": self.agreement_sum / self.agreement_steps if self.agreement_steps else None,
            "judge_pairs": s.judge_pairs if s.judgements else None,
            "judge_pair_accuracy": s.judge_pairs_right / s.judge_pairs_checked if s.judge_pairs_checked else None,
            "verified_share": verified / s.judged_responses if verified else None,
            "verifier_score": verifier_sum / verifier_scored if verifier_scored else None,
            "judge_pair_batch_share": (self.judge_pair_batches / self.steps
                                       if self.judge_pair_batches is not None and self.steps else None),
            "pairs_trained": self.pairs_trained,
            "unused_pairs": self.unused_pairs,
            "steps": self.steps,
            "pairs_per_s": self.pairs_trained / self.seconds if self.seconds else None,
            "val_loss": self.val_loss,
            "checkpoint": self.checkpoint,
        }

    @staticmethod
    def from_dict(d: dict) -> "IterationSummary":
        return IterationSummary(**{**d, "stats": OutcomeStats(**d["stats"])})


class IterativeAlgorithm(OnlineIterations):
    def __init__(self, cfg: Config, ctx: RunContext, pools: Pools, *, checkpoints: Checkpoints,
                 reference_dir: str, stopper: Stopper | None = None, resume: Checkpoint | None = None,
                 journal: RolloutJournal | None = None):
        self.cfg, self.ctx, self.pools = cfg, ctx, pools
        self.sampling = sampling_params(cfg.algorithm.sampling, ctx.renderer.stop_strings)
        self.checkpoints = checkpoints
        self.stopper = stopper or Stopper()
        self.reference_dir = reference_dir  # where M_t, the current reference, is on disk
        self.step = 0  # optimizer steps over the whole run
        self.consumed = 0  # pairs (or SFT samples) trained on over the whole run
        self.version = 0  # weight version the pools serve
        self.summaries: list[IterationSummary] = []
        self._table_rows: list[list] = []  # the latest batch's pairs, for the generations table
        self._validated_at, self._val_loss = -1, None
        self._val_cache: list[TrainSample] | None = None
        self._judgement_log: list[list] = []  # rows waiting for the next step (JUDGEMENT_TABLE_COLUMNS[2:])
        self._warned: set[tuple[int, str]] = set()
        self._batcher: GlobalBatcher | None = None  # the current iteration's (its queue is state)
        self._pipeline_now: RolloutPipeline | None = None
        self._sft_position = 0  # SFT iteration: prompts of the epoch order consumed by finished steps
        self._resume = resume
        self._journal = journal  # checkpoint.record_rollouts: the pools' results, recorded before they are used

    # ---- what a subclass provides ----------------------------------------------------------------------

    def _iteration(self, summary: IterationSummary, state: dict | None) -> None:
        """Train one iteration (the default: stream pairs from the pipeline into exact batches). `state` is
        the checkpointed state of this iteration when the run resumes in its middle."""
        self._streaming_iteration(summary, state)

    def _pipeline(self, iteration: int, skip: int) -> RolloutPipeline:
        """The iteration's pipeline over its records, the first `skip` of them left out (already released)."""
        raise NotImplementedError

    def _open_pipeline(self, iteration: int, skip: int) -> RolloutPipeline:
        pipeline = self._pipeline(iteration, skip)
        pipeline.released = skip
        pipeline.journal = self._journal
        return pipeline

    def _outcomes(self, scored: ScoredPrompt, summary: IterationSummary) -> list[PromptOutcome]:
        """What one scored prompt contributes to the batches, in order."""
        raise NotImplementedError

    def _step_metrics(self, batch: Batch, pipeline: RolloutPipeline) -> dict:
        """Algorithm-specific train/ metrics of a step (without the prefix)."""
        return {}

    def _judge_pair_cap(self) -> int:
        return 0

    def _judgement_rows(self, scored: ScoredPrompt) -> list[list]:
        """Rows of JUDGEMENT_TABLE_COLUMNS after (step, iteration) for what judged this prompt (none: no judge)."""
        return []

    def _watch(self, summary: IterationSummary) -> None:
        """Called after every prompt released: say loudly, as it happens, when the data cannot train."""
        s = summary.stats
        if s.prompts >= WATCH_AFTER_PROMPTS and s.bad_samples / s.prompts >= BAD_SAMPLE_ALARM:
            self._warn_once(summary, "bad", f"[iteration {summary.iteration}] WARNING: {s.bad_samples} of "
                            f"{s.prompts} prompts so far gave no pair ({self._top_reasons(summary)})")

    def _why_nothing_trained(self, summary: IterationSummary) -> str:
        """What to say (and what to try) when an iteration trained no step."""
        return ""

    def _extra_state(self) -> dict:
        """Algorithm-specific state of the current iteration, for a mid-iteration checkpoint."""
        return {}

    # ---- the run -------------------------------------------------------------------------------------

    def run(self) -> list[IterationSummary]:
        a = self.cfg.algorithm
        start_it, mid_state = self._restore()
        for it in range(start_it, a.max_iterations):
            if self._steps_exhausted():
                self.ctx.log(f"[run] algorithm.max_steps={a.max_steps} reached")
                break
            if mid_state is not None:
                summary = self.summaries[-1]
            else:
                summary = IterationSummary(it)
                self.summaries.append(summary)
                self._table_rows = []
                self._evaluate(summary)
            start = time.perf_counter()
            replayed = self._journal.replayed if self._journal else 0
            self._iteration(summary, mid_state)
            mid_state = None
            if self._journal and self._journal.replayed > replayed:
                self.ctx.log(f"[iteration {it}] {self._journal.replayed - replayed} pool call(s) answered from the "
                             f"rollout journal ({self._journal.root}), as the stopped run got them")
            summary.seconds += time.perf_counter() - start
            summary.val_loss = self._validate()
            # Before the iteration's checkpoint, which records metrics.jsonl's length: a run resumed from it
            # keeps this row. Also when nothing trained (a collapsed judge shows in top_score_share).
            self._log_row(summary, "iter")
            if summary.steps == 0 and not self._steps_exhausted():
                raise NothingToTrain(self._nothing_trained_message(summary))
            path = self._save(f"iter_{it}", "end")
            if self._journal:  # a resume never goes back into this iteration
                self._journal.discard(it)
            summary.checkpoint = str(path)
            self.ctx.log(f"[iteration {it}] done: {summary.steps} steps, {summary.pairs_trained} pairs, "
                         f"checkpoint {path}")
            crash_point("boundary")
            self._boundary(path)
            reason = self.stopper.requested()
            if reason:  # the iteration's checkpoint is where the next start continues
                raise StopRequested(reason, str(path))
        if self.ctx.evaluator is not None:
            final = IterationSummary(len(self.summaries))
            self._evaluate(final)
            self.summaries.append(final)
            # final/, not iter/: logged at the last iteration's step, it would overwrite that row's iter/
            # values in wandb (one history row per step).
            self._log_row(final, "final")
        return self.summaries

    def _log_row(self, summary: IterationSummary, prefix: str) -> None:
        """The end-of-run table's row as `<prefix>/<key>` metrics at the current step (numbers only)."""
        numbers = {f"{prefix}/{k}": v for k, v in summary.row().items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.ctx.metrics.log(numbers, self.step)

    def _evaluate(self, summary: IterationSummary) -> None:
        """Ground truth on held-out data (toy world only): M_t's greedy task accuracy and, when M_t is also the
        judge, its judge accuracy on held-out probes."""
        if self.ctx.evaluator is None:
            return
        summary.task_accuracy = self.ctx.evaluator.task_accuracy(self.pools.generate)
        if len(self.pools.judges) and self.pools.judges.follows_policy:
            summary.heldout_judge_accuracy = self.ctx.evaluator.judge_accuracy(self.pools.generate)

    def _nothing_trained_message(self, summary: IterationSummary) -> str:
        s, a = summary.stats, self.cfg.algorithm
        made = summary.unused_pairs
        lines = [f"iteration {summary.iteration} trained no step, so the run would learn nothing: {s.prompts} "
                 f"prompts gave {made} pair(s), fewer than algorithm.global_batch_size={a.global_batch_size}"]
        if s.prompts:
            lines.append(f"{s.bad_samples} of {s.prompts} prompts gave no pair ({self._top_reasons(summary)})")
        why = self._why_nothing_trained(summary)
        if why:
            lines.append(why)
        if made:
            lines.append("try: more prompts (data.train_file, algorithm.limit_train_batches) or a smaller "
                         "algorithm.global_batch_size")
        lines.append(f"samples of what the judge wrote: {Path(self.cfg.output_dir) / 'table_judgements.jsonl'}")
        return "; ".join(lines)

    @staticmethod
    def _top_reasons(summary: IterationSummary) -> str:
        top = sorted(summary.bad_reasons.items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{n} x {reason}" for reason, n in top) or "no reason recorded"

    def _warn_once(self, summary: IterationSummary, what: str, message: str) -> None:
        if (summary.iteration, what) not in self._warned:
            self._warned.add((summary.iteration, what))
            self.ctx.log(message)

    def _flush_judgements(self, iteration: int) -> None:
        if self._judgement_log:
            rows = [[self.step, iteration, *row] for row in self._judgement_log]
            self.ctx.metrics.table("table/judgements", list(JUDGEMENT_TABLE_COLUMNS), rows, self.step)
            self._judgement_log = []

    def _boundary(self, checkpoint: Path) -> None:
        """M_{t+1} becomes what the pools serve and (algorithm.reference_update=iteration) the reference."""
        if self.cfg.algorithm.reference_update == "iteration":
            self.pools.learner.update_reference()
            self.reference_dir = str(checkpoint)
        if self.cfg.algorithm.reset_optimizer_each_iteration:
            self.pools.learner.reset_optimizer()
        self.version += 1
        refit(self.pools, self.version)

    # ---- checkpoints ---------------------------------------------------------------------------------

    def _save(self, name: str, phase: str) -> Path:
        """A checkpoint of the learner and of the run's state. phase "end": an iteration just ended (its
        boundary not yet crossed); "mid": inside an iteration, between two steps."""
        self.ctx.metrics.flush()
        state = {
            "phase": phase, "iteration": self.summaries[-1].iteration, "step": self.step,
            "consumed_samples": self.consumed, "weight_version": self.version, "reference": self.reference_dir,
            "summaries": [dataclasses.asdict(s) for s in self.summaries], "table_rows": self._table_rows,
            "validated_at": self._validated_at, "val_loss": self._val_loss,
            "metrics_bytes": self.ctx.metrics.sizes(),
        }
        if phase == "mid":
            state["position"] = {"released": self._pipeline_now.released if self._pipeline_now else 0,
                                 "sft": self._sft_position}
            state["batcher"] = self._batcher.state() if self._batcher is not None else None
            state["meta_too_long"] = self._pipeline_now.counters.meta_too_long if self._pipeline_now else 0
            state["extra"] = self._extra_state()
        streaming = self._streaming_state() if phase == "mid" else None
        if streaming is None:
            return self.checkpoints.save(name, self.pools.learner.save, state)
        state["streaming"], versions = streaming

        def write(directory: str) -> None:  # the learner's files and the weight versions a resume still serves
            self.pools.learner.save(directory)
            self._weights.save(Path(directory) / WEIGHTS_DIR, versions)
        return self.checkpoints.save(name, write, state)

    def _restore(self) -> tuple[int, dict | None]:
        """(first iteration to run, the mid-iteration state to continue from or None)."""
        if self._resume is None:
            return 0, None
        st = self._resume.state
        self.step, self.consumed = st["step"], st["consumed_samples"]
        self.summaries = [IterationSummary.from_dict(d) for d in st["summaries"]]
        self._table_rows, self._validated_at, self._val_loss = st["table_rows"], st["validated_at"], st["val_loss"]
        self.reference_dir = st["reference"]
        if st["phase"] == "end":  # the boundary after this checkpoint was crossed by the driver's setup
            self.version = st["weight_version"] + 1
            if self.cfg.algorithm.reference_update == "iteration":
                self.reference_dir = str(self._resume.path)
            return st["iteration"] + 1, None
        self.version = st["weight_version"]
        return st["iteration"], st

    def _save_step(self) -> Path:
        path = self._save(f"step_{self.step}", "mid")
        self.ctx.log(f"[checkpoint] step {self.step}: {path}")
        return path

    def _stop_here(self, reason: str | None, failure: Exception | None) -> None:
        """Save a mid-iteration checkpoint and stop: cleanly (StopRequested) or re-raising a pool failure."""
        path = self._save_step()
        if failure is not None:
            raise failure
        raise StopRequested(reason, str(path))

    # ---- iterations -----------------------------------------------------------------------------------

    def _streaming_iteration(self, summary: IterationSummary, state: dict | None) -> None:
        """Prompts flow through the pipeline into exact global batches; one learner step runs at a time
        while later prompts are generated. With algorithm.refit_every_steps the pools also follow the
        learner inside the iteration (algorithms/online.py)."""
        a = self.cfg.algorithm
        if a.refit_every_steps is not None:
            self._online_iteration(summary, state)
            return
        it = summary.iteration
        loss_cfg = self._loss_config(it)
        skip = state["position"]["released"] if state else 0
        pipeline = self._pipeline_now = self._open_pipeline(it, skip)
        batcher = self._batcher = GlobalBatcher(a.global_batch_size, judge_pair_cap=self._judge_pair_cap())
        if state:
            batcher.restore(state["batcher"])
            pipeline.counters.meta_too_long = state["meta_too_long"]
        in_training: tuple[list, Batch, float] | None = None
        failure: Exception | None = None
        last_log = time.perf_counter()
        stages = "generate + judge" if len(self.pools.judges) else "generate"
        progress = tqdm(total=self._prompts_in_iteration(it), initial=skip, unit="prompt", mininterval=2.0,
                        desc=f"[iteration {it}] {stages}", dynamic_ncols=True, leave=False)
        while True:
            reason = self.stopper.requested()
            stopping = reason is not None or failure is not None
            if stopping and in_training is None:
                self._stop_here(reason, failure)
            while (not stopping and not self._steps_exhausted() and
                   pipeline.prompts_in_flight + max(0, batcher.buffered_pairs - a.global_batch_size)
                   < a.max_prompts_ahead):
                if not pipeline.submit_next():
                    break
            for scored in pipeline.pop_ready():
                self._take_scored(scored, summary, batcher, pipeline, progress)
            if in_training is None and not stopping and batcher.ready() and not self._steps_exhausted():
                batch = batcher.pop()
                in_training = (self.pools.learner.train_step_async(batch.samples, loss_cfg), batch,
                               time.perf_counter())
                crash_point("step")
            over, metrics, failed = self._wait_round(pipeline, in_training, stopping)
            if over:
                break
            failure = failed or failure
            if metrics is not None:
                _, batch, started = in_training
                now = time.perf_counter()
                self._log_step(metrics, batch, summary, now - started, now - last_log, pipeline, loss_cfg)
                self._after_step()
                last_log = now
                in_training = None
        progress.close()
        self._flush_judgements(it)
        leftover, judge_left = batcher.drain()
        summary.unused_pairs = sum(o.sample is not None for o in leftover) + len(judge_left)
        self.ctx.metrics.log({"train/unused_pairs": summary.unused_pairs, "train/iteration": it}, self.step)
        if summary.unused_pairs:
            self.ctx.log(f"[iteration {it}] {summary.unused_pairs} pairs left over (fewer than "
                         f"global_batch_size={a.global_batch_size}) are not trained on")
        self._pipeline_now = self._batcher = None

    def _wait_round(self, pipeline: RolloutPipeline, in_training, stopping: bool):
        """Wait for the next pipeline call or the step in training, and move the pipeline on: (nothing left to
        wait for, the step's metrics once every rank has finished it, a pool failure to stop on)."""
        # Only the ranks still busy: a finished rank's ref would make every wait return at once.
        training = ray.wait(in_training[0], num_returns=len(in_training[0]), timeout=0)[1] if in_training else []
        waitables = (pipeline.pending() if not self._steps_exhausted() and not stopping else []) + training
        if not waitables and in_training is None:
            return True, None, None
        # A step that has already finished is collected at once, not after the pipeline's next event.
        ready = self.pools.wait(waitables, timeout_s=0.0 if in_training and not training else 1.0)
        failure = None
        try:
            pipeline.advance(ready)
        except ReplicaFailed as e:  # the caller finishes the step in flight, checkpoints, then stops
            failure = e
        if in_training is None:
            return False, None, failure
        refs = in_training[0]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        raise_learner_failures(done)  # a dead worker leaves the others waiting in a collective
        return False, (ray.get(refs)[0] if len(done) == len(refs) else None), failure

    def _take_scored(self, scored: ScoredPrompt, summary: IterationSummary, batcher: GlobalBatcher,
                     pipeline: RolloutPipeline, progress) -> None:
        """A released prompt's outcomes into the batcher, with its counts, judgement rows and progress."""
        for outcome in self._outcomes(scored, summary):
            batcher.add(outcome)
            if outcome.sample is None and outcome.reason:
                summary.bad_reasons[outcome.reason] = summary.bad_reasons.get(outcome.reason, 0) + 1
        room = JUDGEMENT_TABLE_ROWS - len(self._judgement_log)
        if room > 0:
            self._judgement_log += self._judgement_rows(scored)[:room]
        self._watch(summary)
        progress.update(1)
        progress.set_postfix_str(self._progress_text(summary, pipeline), refresh=False)

    def _sft_iteration(self, summary: IterationSummary, state: dict | None) -> None:
        """Plain supervised fine-tuning on the ground-truth answers (Self-Rewarding's first_iteration_sft)."""
        a = self.cfg.algorithm
        loss_cfg = LossConfig(sft_loss_weight=1.0, preference_loss_weight=0.0,
                              sft_average_log_probs=a.sft_average_log_probs)
        self._sft_position = state["position"]["sft"] if state else 0
        order = [(epoch, index) for epoch in range(a.max_epochs) for index in self._order(summary.iteration, epoch)]
        buffer: list[TrainSample] = []
        for position in range(self._sft_position, len(order)):
            epoch, index = order[position]
            if self._steps_exhausted():
                break
            reason = self.stopper.requested()
            if reason:
                self._stop_here(reason, None)
            encoded = self.ctx.encode(self.ctx.train[index])
            if encoded is None or encoded.answer_ids is None:
                continue
            buffer.append(TrainSample(encoded.prompt_ids, encoded.answer_ids))
            if len(buffer) == a.global_batch_size:
                start = time.perf_counter()
                refs = self.pools.learner.train_step_async(buffer, loss_cfg)
                crash_point("step")
                metrics = self.pools.get(refs)[0]
                self.step += 1
                self.consumed += len(buffer)
                summary.steps += 1
                summary.pairs_trained += len(buffer)
                self._sft_position = position + 1
                self._emit({**{f"train/{k}": v for k, v in metrics.items()},
                            "train/step_time": time.perf_counter() - start, "train/epoch": epoch,
                            "train/iteration": summary.iteration, "train/consumed_samples": self.consumed})
                self._after_step()
                buffer = []
        summary.unused_pairs = len(buffer)
        self.ctx.metrics.log({"train/unused_pairs": summary.unused_pairs, "train/iteration": summary.iteration},
                             self.step)
        self._sft_position = 0

    # ---- pieces -----------------------------------------------------------------------------------------

    def _order(self, iteration: int, epoch: int) -> list[int]:
        """This epoch's prompt order, cut to algorithm.limit_train_batches."""
        a = self.cfg.algorithm
        order = list(range(len(self.ctx.train)))
        random.Random(f"{self.cfg.seed}/{iteration}/{epoch}").shuffle(order)
        return order[: limited(len(order), a.limit_train_batches, a.global_batch_size)]

    def _records(self, iteration: int, skip: int = 0, with_answers: bool = False) -> Iterator[PromptRecord]:
        """The iteration's prompts, epoch after epoch, the first `skip` left out; too-long prompts are not
        records (the context counts them)."""
        return itertools.islice(self._all_records(iteration, with_answers), skip, None)

    def _all_records(self, iteration: int, with_answers: bool) -> Iterator[PromptRecord]:
        for epoch in range(self.cfg.algorithm.max_epochs):
            for index in self._order(iteration, epoch):
                conv = self.ctx.train[index]
                encoded = self.ctx.encode(conv)
                if encoded is None:
                    continue
                yield PromptRecord(index, epoch, encoded.prompt_ids, self.ctx.user_text(encoded.prompt_messages),
                                   self.ctx.last_user_text(encoded.prompt_messages), conv.metadata,
                                   encoded.answer_ids if with_answers else None)

    def _prompts_in_iteration(self, iteration: int) -> int:
        """Prompts the iteration releases (its epochs' orders; too-long prompts, dropped later, included)."""
        return sum(len(self._order(iteration, epoch)) for epoch in range(self.cfg.algorithm.max_epochs))

    def _progress_text(self, summary: IterationSummary, pipeline: RolloutPipeline) -> str:
        s = summary.stats
        elapsed = max(1e-9, time.perf_counter() - pipeline.started)
        parts = [f"{pipeline.counters.total_tokens / elapsed:.0f} tok/s"]
        if s.judgements:
            parts.append(f"parse {s.valid_judgements / s.judgements:.0%}")
        if s.prompts:
            parts.append(f"no pair {s.bad_samples / s.prompts:.0%}")
        parts.append(f"steps {summary.steps}")
        return ", ".join(parts)

    def _log_step(self, metrics: dict, batch: Batch, summary: IterationSummary, step_time: float,
                  window: float, pipeline: RolloutPipeline, loss_cfg: LossConfig, extra: dict | None = None) -> None:
        self.step += 1
        self.consumed += len(batch.samples)
        summary.steps += 1
        summary.pairs_trained += len(batch.samples)
        s = batch.stats
        gen_tokens, judge_tokens = pipeline.counters.take()
        row = {f"train/{k}": v for k, v in metrics.items()}
        row.update({f"train/{k}": v for k, v in self._step_metrics(batch, pipeline).items()})
        # Length explosion: the actor pairs only (the learner's chosen/reject_lengths include judge pairs).
        if batch.outcomes:
            chosen = sum(len(o.sample.chosen_ids) for o in batch.outcomes)
            rejected = sum(len(o.sample.rejected_ids) for o in batch.outcomes)
            summary.actor_pairs += len(batch.outcomes)
            summary.chosen_tokens += chosen
            summary.rejected_tokens += rejected
            row["train/chosen_response_tokens"] = chosen / len(batch.outcomes)
            row["train/rejected_response_tokens"] = rejected / len(batch.outcomes)
        # Judge vs the policy's implicit reward: `acc`, taken at the pre-update policy. The first step of an
        # iteration has policy == reference, every log-ratio 0 and no pair strictly ahead, so it reads 0; it
        # is kept in the iteration's mean (which so leans low by about 1/steps).
        if "acc" in metrics:
            row["train/reward_agreement"] = metrics["acc"]
            summary.agreement_sum += metrics["acc"]
            summary.agreement_steps += 1
        if summary.judge_pair_batches is not None:
            summary.judge_pair_batches += bool(batch.judge_samples)
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
        if len(self.pools.judges):
            row["train/judge_tokens_per_s"] = judge_tokens / window
        row["train/actor_restarts"] = self.pools.actor_restarts
        if extra:
            row.update(extra)
        self._table_rows = [[self.step, o.prompt_text, o.chosen_text, o.rejected_text, o.sample.chosen_score,
                             o.sample.rejected_score] for o in batch.outcomes[:GENERATION_TABLE_ROWS]]
        self._emit(row)
        self._flush_judgements(summary.iteration)

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

    def _validate(self) -> float | None:
        """val/loss on the validation answers, and the latest batch's pairs as `table/train_generations`."""
        if self._validated_at == self.step:  # already done at this step (interval and iteration end met)
            return self._val_loss
        self._validated_at = self.step
        # Written even with no pair to show: an empty table says so where a missing one says nothing.
        self.ctx.metrics.table("table/train_generations", list(GENERATION_TABLE_COLUMNS), self._table_rows,
                               self.step)
        samples = self._val_samples()
        if not samples:
            return None
        loss = self.pools.learner.sft_nll(samples)
        self._val_loss = loss
        self.ctx.metrics.log({"val/loss": loss}, self.step)
        self.ctx.log(f"[validation] step {self.step}: val/loss={loss:.4f}")
        return loss

    def _val_samples(self) -> list[TrainSample]:
        """The validation answers, tokenised once (limit_val_batches applied)."""
        if self._val_cache is None:
            self._val_cache = []
            a = self.cfg.algorithm
            count = limited(len(self.ctx.val), a.limit_val_batches, a.global_batch_size) if self.ctx.val else 0
            for i in range(count):
                encoded = self.ctx.encode(self.ctx.val[i])
                if encoded is not None and encoded.answer_ids is not None:
                    self._val_cache.append(TrainSample(encoded.prompt_ids, encoded.answer_ids))
        return self._val_cache

    def _after_step(self) -> None:
        """Step-interval work: validation with the generations table, and checkpoints."""
        a = self.cfg.algorithm
        if a.val_check_interval > 0 and self.step % a.val_check_interval == 0:
            self._validate()
        if a.save_interval > 0 and self.step % a.save_interval == 0:
            self._save_step()

    def _steps_exhausted(self) -> bool:
        cap = self.cfg.algorithm.max_steps
        return cap != -1 and self.step >= cap
