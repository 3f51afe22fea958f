"""What the pools ask of every replica (orchestration/cluster.py: status, ping, weight_version, load_weights),
for a judge replica with no local weights to refit: a remote judge or a rule-based one. Its weight version is
always 0 (FIXED in its judgements); a refit is refused."""

from __future__ import annotations

import uuid

import ray


class FixedHost:
    backend = ""  # judge.backend, for the refusal's message

    def __init__(self) -> None:
        self.incarnation = uuid.uuid4().hex

    def status(self) -> tuple[str, int]:
        return self.incarnation, 0

    def weight_version(self) -> int:
        return 0

    def load_weights(self, version: int, *buckets) -> int:
        if buckets or version != 0:
            raise ValueError(f"judge.backend={self.backend} does not follow the policy: its replicas are never refit")
        return 0

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        return True
