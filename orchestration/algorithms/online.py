"""The iteration loop with streaming refits (algorithm.refit_every_steps, orchestration/streaming.py): the
same stages as the boundary loop (iterative._streaming_iteration), with the pools following the learner
every N steps on a schedule decided from the data, so that a resumed run repeats it exactly."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from ..batching import GlobalBatcher
from ..faults import crash_point
from ..streaming import WEIGHTS_DIR, Schedule, WeightVersions, publish


class OnlineIterations:
    """Mixed into IterativeAlgorithm; uses its pieces (_pipeline, _outcomes, _log_step, ...)."""

    _schedule: Schedule | None = None
    _weights: WeightVersions | None = None

    def _online_iteration(self, summary, state: dict | None) -> None:
        a = self.cfg.algorithm
        it = summary.iteration
        loss_cfg = self._loss_config(it)
        skip = state["position"]["released"] if state else 0
        pipeline = self._pipeline_now = self._open_pipeline(it, skip)
        batcher = self._batcher = GlobalBatcher(a.global_batch_size, judge_pair_cap=self._judge_pair_cap())
        weights = self._weights = pipeline.weights = WeightVersions()
        policy_pools = self.pools.policy_pools
        if state:
            batcher.restore(state["batcher"])
            pipeline.counters.meta_too_long = state["meta_too_long"]
            sched = Schedule.from_state(state["streaming"])
            sched.submitted = sched.released  # the chunks in flight at the checkpoint are submitted again
            weights.load(Path(self._resume.path) / WEIGHTS_DIR)
            # The replicas were created with the checkpoint's learner weights, which are not the version
            # they must serve unless the checkpoint's step published it: load it (nothing is in flight).
            for pool in policy_pools:
                pool.load(self.version, weights.refs(self.version))
        else:
            cap = None if a.max_steps == -1 else a.max_steps - self.step
            sched = Schedule.start(a.refit_every_steps, max(1, a.max_prompts_ahead // a.rollout_batch_size),
                                   self.version, a.max_policy_lag, cap)
            publish(self.pools, weights, self.version)  # the learner holds the iteration's first version now
        self._schedule = sched
        # A replica restarted mid-iteration is brought to pool.version from the object store (publish keeps
        # it current), not by the collective transport, whose peers may serve other versions now.
        restores = [(pool, pool.restore) for pool in policy_pools]
        for pool in policy_pools:
            pool.restore = None
        try:
            self._online_loop(summary, pipeline, batcher, sched, weights, loss_cfg)
        finally:
            for pool, restore in restores:
                pool.restore = restore
        self._flush_judgements(it)
        leftover, judge_left = batcher.drain()
        summary.unused_pairs = sum(o.sample is not None for o in leftover) + len(judge_left) + sum(
            len(f.batch.samples) for f in sched.queue)
        summary.stale_pairs_dropped = sched.dropped
        row = {"train/unused_pairs": summary.unused_pairs, "train/iteration": it,
               "iter/stale_pairs_dropped": sched.dropped}
        if summary.lag_pairs:
            row["iter/policy_lag_mean"] = summary.lag_sum / summary.lag_pairs
            row["iter/policy_lag_max"] = summary.lag_max
        self.ctx.metrics.log(row, self.step)
        if summary.unused_pairs:
            self.ctx.log(f"[iteration {it}] {summary.unused_pairs} pairs left over (fewer than "
                         f"global_batch_size={a.global_batch_size}) are not trained on")
        if sched.dropped:
            self.ctx.log(f"[iteration {it}] {sched.dropped} pairs dropped as older than algorithm.max_policy_lag="
                         f"{a.max_policy_lag} versions (fewer with a smaller algorithm.max_prompts_ahead)")
        self._pipeline_now = self._batcher = self._schedule = self._weights = None

    def _online_loop(self, summary, pipeline, batcher, sched: Schedule, weights: WeightVersions, loss_cfg) -> None:
        it = summary.iteration
        in_training = None  # (refs, FormedBatch, started)
        failure: Exception | None = None
        stream_over = False
        last_log = time.perf_counter()
        stages = "generate + judge" if len(self.pools.judges) else "generate"
        progress = tqdm(total=self._prompts_in_iteration(it), initial=pipeline.released, unit="prompt",
                        mininterval=2.0, desc=f"[iteration {it}] {stages}, refit every {sched.every} steps",
                        dynamic_ncols=True, leave=False)
        while True:
            reason = self.stopper.requested()
            stopping = reason is not None or failure is not None
            if stopping and in_training is None:
                self._stop_here(reason, failure)
            while not stopping and not stream_over and not self._steps_exhausted():
                version = sched.next_version()
                if version is None or version > self.version:  # not scheduled yet, or not published yet
                    break
                if not pipeline.submit_next(version):
                    stream_over = True
                    break
                sched.submitted += 1
            for chunk in pipeline.pop_ready_chunks():
                for scored in chunk:
                    self._take_scored(scored, summary, batcher, pipeline, progress)
                sched.release(batcher)
            if in_training is None and not stopping and sched.queue and not self._steps_exhausted():
                formed = sched.queue.popleft()
                in_training = (self.pools.learner.train_step_async(formed.batch.samples, loss_cfg), formed,
                               time.perf_counter())
                crash_point("step")
            over, metrics, failed = self._wait_round(pipeline, in_training, stopping)
            if over:
                break
            failure = failed or failure
            if metrics is not None:
                _, formed, started = in_training
                now = time.perf_counter()
                extra = self._online_metrics(summary, formed, pipeline)
                version = sched.published_after(formed.step)
                if version is not None:  # before the step's checkpoint (in _after_step), which records it
                    extra["train/refit_time_s"] = publish(self.pools, weights, version)
                    self.version = version
                    weights.keep(sched.needed() | {version})
                self._log_step(metrics, formed.batch, summary, now - started, now - last_log, pipeline, loss_cfg,
                               extra)
                self._after_step()
                last_log = now
                in_training = None
        progress.close()

    def _online_metrics(self, summary, formed, pipeline) -> dict:
        lags = formed.lags
        summary.lag_sum += sum(lags)
        summary.lag_pairs += len(lags)
        summary.lag_max = max([summary.lag_max, *lags])
        loads, waited = pipeline.counters.take_refits()
        return {"train/policy_lag_mean": sum(lags) / len(lags) if lags else 0.0,
                "train/policy_lag_max": max(lags, default=0), "train/stale_pairs_dropped": formed.dropped,
                "train/weight_version": formed.version, "train/refit_loads": loads,
                "train/pool_refit_wait_s": waited}

    def _streaming_state(self) -> tuple[dict, set[int]] | None:
        """(the schedule's checkpoint state, the versions whose buckets the checkpoint must store), or None
        outside an iteration with streaming refits."""
        if self._schedule is None:
            return None
        return self._schedule.state(), {v for v in self._schedule.needed() | {self.version} if v <= self.version}
