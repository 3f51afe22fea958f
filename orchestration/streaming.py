"""Streaming refits (SPEC 8b, docs/streaming.md): with `algorithm.refit_every_steps=N` the pools take the
learner's weights every N optimizer steps inside an iteration, instead of only at its boundary.

The schedule (which chunk of prompts is generated at which weight version, which pairs train at which step)
is decided from the data alone, never from timing, so a run resumes bit for bit:
- The iteration's prompts go out in chunks (algorithm.rollout_batch_size). Chunks 0..A-1 are generated at the
  iteration's first version, A = max_prompts_ahead // rollout_batch_size chunks of look-ahead.
- When chunk c is released (in order), its outcomes join the batcher and every batch they complete is formed
  at once: batch k (the iteration's k-th step) trains the learner at version base + (k-1) // N. Before it is
  formed, pairs more than max_policy_lag versions older than that are dropped (and counted).
- Chunk c + A is then scheduled at version base + (batches formed so far) // N: the newest version those
  batches make. It is submitted once the learner has trained that far and published the version (every N
  steps, right after the step, its weights go into the object store as that version's buckets).
- Every call to a pool that follows the policy names its chunk's version and carries that version's buckets;
  a replica serving another version loads them first, between calls (actors/engine_host.call_at). A
  response or judgement is so always made by one version, and a restarted replica re-issues its work at the
  version the chunk was scheduled at.
A mid-iteration checkpoint stores the schedule, the formed batches not yet trained, and the buckets of every
version a resumed run still needs (the chunks scheduled but not released); later versions it recomputes.
"""

from __future__ import annotations

import pickle
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import ray

from learner.types import TrainSample
from refit_wire import DEFAULT_BUCKET_BYTES

from .batching import Batch, GlobalBatcher, OutcomeStats, PromptOutcome

WEIGHTS_DIR = "streaming_weights"  # in a mid-iteration checkpoint: one file per stored weight version


class WeightVersions:
    """The object-store buckets of every weight version the iteration may still serve."""

    def __init__(self):
        self._refs: dict[int, list] = {}

    @property
    def versions(self) -> list[int]:
        return sorted(self._refs)

    def publish(self, version: int, refs: list) -> None:
        self._refs[version] = list(refs)

    def refs(self, version: int) -> list:
        if version not in self._refs:
            raise RuntimeError(f"weight version {version} is not held (held: {self.versions})")
        return self._refs[version]

    def keep(self, versions: set[int]) -> None:
        """Let go of every version not in `versions` (calls already issued keep their buckets alive)."""
        self._refs = {v: r for v, r in self._refs.items() if v in versions}

    def save(self, directory: Path, versions: set[int]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for v in sorted(versions):
            with open(directory / f"v{v}.pkl", "wb") as f:
                pickle.dump(ray.get(self.refs(v)), f, protocol=pickle.HIGHEST_PROTOCOL)

    def load(self, directory: Path) -> None:
        for path in sorted(directory.glob("v*.pkl")):
            with open(path, "rb") as f:
                self._refs[int(path.stem[1:])] = [ray.put(b) for b in pickle.load(f)]


@dataclass
class FormedBatch:
    """A batch formed for step `step` of the iteration, training the learner at `version`."""

    step: int
    version: int
    batch: Batch
    dropped: int  # stale pairs dropped while it was formed

    @property
    def lags(self) -> list[int]:
        versions = [o.version for o in self.batch.outcomes] + list(self.batch.judge_versions)
        return [self.version - v for v in versions if v is not None]

    def to_dict(self) -> dict:
        b = self.batch
        return {"step": self.step, "version": self.version, "dropped": self.dropped,
                "outcomes": [o.to_dict() for o in b.outcomes], "judge_samples": [asdict(s) for s in b.judge_samples],
                "judge_versions": list(b.judge_versions), "stats": asdict(b.stats)}

    @staticmethod
    def from_dict(d: dict) -> "FormedBatch":
        batch = Batch([PromptOutcome.from_dict(o) for o in d["outcomes"]],
                      [TrainSample(**s) for s in d["judge_samples"]], OutcomeStats(**d["stats"]),
                      list(d["judge_versions"]))
        return FormedBatch(d["step"], d["version"], batch, d["dropped"])


@dataclass
class Schedule:
    """One iteration's deterministic version schedule (see the module docstring). Its state is checkpointed."""

    every: int  # N: a version is published after every N steps of the iteration
    lookahead: int  # A: chunks scheduled ahead of the last released one
    base: int  # the version the iteration starts at
    max_lag: int | None
    step_cap: int | None  # steps the iteration may still form (algorithm.max_steps); None: no cap
    decided: list[int] = field(default_factory=list)  # versions of the chunks from `released` on
    released: int = 0  # chunks released
    submitted: int = 0  # chunks submitted
    formed_steps: int = 0  # batches formed this iteration (trained, training or queued)
    pending_dropped: int = 0  # stale pairs dropped since the last formed batch
    dropped: int = 0  # stale pairs dropped this iteration
    queue: deque = field(default_factory=deque)  # FormedBatch waiting for the learner

    @staticmethod
    def start(every: int, lookahead: int, base: int, max_lag: int | None, step_cap: int | None) -> "Schedule":
        return Schedule(every, lookahead, base, max_lag, step_cap, decided=[base] * lookahead)

    def learner_version(self, step: int) -> int:
        """The version the learner is at while it trains the iteration's `step`-th step (1-based)."""
        return self.base + (step - 1) // self.every

    def next_version(self) -> int | None:
        """The version of the next chunk to submit, None while it is not scheduled yet."""
        at = self.submitted - self.released
        return self.decided[at] if at < len(self.decided) else None

    def release(self, batcher: GlobalBatcher) -> list[FormedBatch]:
        """A chunk was released and its outcomes added to `batcher`: form every batch they complete, then
        schedule the chunk `lookahead` further on."""
        self.released += 1
        self.decided.pop(0)
        formed = []
        while self.step_cap is None or self.formed_steps < self.step_cap:
            step = self.formed_steps + 1
            version = self.learner_version(step)
            if self.max_lag is not None:
                dropped = batcher.drop_older_than(version - self.max_lag)
                self.pending_dropped += dropped
                self.dropped += dropped
            if not batcher.ready():
                break
            formed.append(FormedBatch(step, version, batcher.pop(), self.pending_dropped))
            self.formed_steps, self.pending_dropped = step, 0
        self.queue.extend(formed)
        self.decided.append(self.base + self.formed_steps // self.every)
        return formed

    def published_after(self, step: int) -> int | None:
        """The version published once the iteration's `step`-th step is done, or None."""
        return self.base + step // self.every if step % self.every == 0 else None

    def needed(self) -> set[int]:
        """Versions a chunk still to be released is scheduled at."""
        return set(self.decided)

    def state(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "queue"}
        d["decided"] = list(self.decided)
        d["queue"] = [f.to_dict() for f in self.queue]
        return d

    @staticmethod
    def from_state(d: dict) -> "Schedule":
        s = Schedule(**{k: v for k, v in d.items() if k != "queue"})
        s.queue = deque(FormedBatch.from_dict(f) for f in d["queue"])
        return s


def publish(pools, weights: WeightVersions, version: int) -> float:
    """The learner's weights now become `version`: its buckets go into the object store (no replica waits
    for this; each loads them before its next call at that version). Seconds it took."""
    start = time.perf_counter()
    refs = pools.learner.export_bucket_refs(DEFAULT_BUCKET_BYTES)
    weights.publish(version, refs)
    for pool in pools.policy_pools:  # what a restarted replica is brought to before its call is re-issued
        pool.version, pool.weight_refs = version, tuple(refs)
    return time.perf_counter() - start
