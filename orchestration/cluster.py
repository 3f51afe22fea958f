"""Ray cluster connection and the three pools: generators, judges, learner group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

from actors.engine_host import EngineSpec
from actors.generator import GeneratorActor
from actors.judge import JudgeActor, JudgeSpec
from learner.group import LearnerGroup, LearnerSpec

from .config import ClusterConfig


def connect(cluster: ClusterConfig, *, judges: bool = True, learner: bool = True) -> bool:
    """Start a local cluster (cluster.address empty) or join an existing one ("auto" or host:port).
    A local cluster gets CPUs for the pools the run uses (`judges`, `learner`).

    Returns True when this call initialised Ray (so the caller shuts it down again)."""
    if ray.is_initialized():
        return False
    if cluster.address:
        ray.init(address=cluster.address, log_to_driver=True)
        return True
    # A local cluster stays on loopback and sends no usage statistics.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    needed = (cluster.generators.replicas * cluster.generators.num_cpus
              + (cluster.judges.replicas * cluster.judges.num_cpus if judges else 0)
              + (cluster.learner.workers * cluster.learner.num_cpus if learner else 0))
    num_cpus = cluster.num_cpus if cluster.num_cpus is not None else int(-(-needed // 1))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


@dataclass
class Pools:
    generators: list  # GeneratorActor handles
    judges: list  # JudgeActor handles; empty when the algorithm has no judge (SPIN, generation)
    learner: LearnerGroup | None  # None for the generation job

    @property
    def engines(self) -> list:
        return self.generators + self.judges

    def shutdown(self) -> None:
        for actor in self.engines:
            ray.kill(actor)
        if self.learner is not None:
            self.learner.shutdown()


def start_pools(cluster: ClusterConfig, gen_engine: EngineSpec, judge_engine: EngineSpec | None = None,
                judge: JudgeSpec | None = None, learner: LearnerSpec | None = None) -> Pools:
    """Start the generator pool, and the judge pool and learner group when given their specs."""
    g, j = cluster.generators, cluster.judges
    gen_cls = ray.remote(GeneratorActor).options(num_cpus=g.num_cpus, num_gpus=g.num_gpus)
    generators = [gen_cls.remote(gen_engine) for _ in range(g.replicas)]
    judges = []
    if judge is not None:
        judge_cls = ray.remote(JudgeActor).options(num_cpus=j.num_cpus, num_gpus=j.num_gpus)
        judges = [judge_cls.remote(judge_engine, judge) for _ in range(j.replicas)]
    group = LearnerGroup(learner) if learner is not None else None  # blocks until torch.distributed is up
    ray.get([a.weight_version.remote() for a in generators + judges])  # engines loaded
    return Pools(generators, judges, group)


def refit(pools: Pools, version: int, bucket_bytes: int) -> None:
    """Publish the learner's weights as `version` and wait until every engine serves it."""
    refs = pools.learner.export_bucket_refs(bucket_bytes)
    loaded = ray.get([a.load_weights.remote(version, *refs) for a in pools.engines])
    if any(v != version for v in loaded):
        raise RuntimeError(f"refit to version {version} failed: engines report {loaded}")
