"""Ray cluster connection, the three pools, failure recovery for engine replicas, and health checks.

Generator and judge replicas are restartable Ray actors (`cluster.max_restarts`). A call whose replica died
is not retried by Ray: the pool waits for the replica to come back, loads the current weight version into
it (a restarted replica starts from the weights it was created with), and the caller issues the call
again with the same seeds, so the tokens are the ones the lost call would have produced. Learner workers
are not restartable: their state is the run's, so a dead worker stops the run (it resumes from the last
checkpoint). How weights reach the replicas (refits, and restarted replicas under the collective transport)
is orchestration/refit.py.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError

from actors.engine_host import StaleWeights
from actors.engines import EngineSpec, engine_class
from actors.generator import GeneratorActor
from actors.judges import judge_backend
from actors.judges.protocol import JudgeSpec
from learner.group import LearnerGroup, LearnerSpec, SetupTimeout

from . import placement
from .config import ClusterConfig
from .errors import LearnerFailed, RefitFailed, ReplicaFailed, one_line

# How long a replica or learner worker may take to start: load (or convert) an 8B checkpoint from a slow disk,
# capture CUDA graphs.
START_TIMEOUT_S = 1800.0
# Errors of a call whose replica died, went away, or came back restarted without the current weights.
RECOVERABLE = (RayActorError, ActorUnavailableError, StaleWeights)


def raise_learner_failures(done: list) -> None:
    """LearnerFailed if a finished learner call failed (its worker died, or a collective failed because a peer
    died: the other ranks would wait in it, so this must not wait for them)."""
    for ref in done:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            raise LearnerFailed(f"a learner worker failed ({type(e).__name__}: {one_line(e)})") from None


def memory_hint(pool: str, cause: str) -> str:
    """What to change when `cause` says a replica of `pool` ran out of memory ("" otherwise)."""
    text = cause.lower()
    if "out of memory" not in text and "outofmemory" not in text and "memory pressure" not in text:
        return ""
    key = "cluster.generators" if pool == "generator" else "cluster.judges"
    return (f": it ran out of memory. Give its KV cache less (engine.kv_cache_memory_gb, or "
            f"engine.gpu_memory_fraction on GPUs), or lower {key}.max_batch_size or model.max_seq_len, or give "
            f"the pool more memory ({key}.num_gpus, {key}.resources)")


def get_within(ref, timeout_s: float, what: str):
    """ray.get of one engine call that must answer within `timeout_s`; ReplicaFailed naming `what` if not."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        raise ReplicaFailed(f"{what} did not answer within {timeout_s:.0f}s") from None


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
    # Ray's start-up INFO lines say nothing the user needs; its warnings and the actors' own output still show.
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    return True


def engine_actor(cls, *, num_cpus: float, num_gpus: float, max_restarts: int = 0, scheduling_strategy=None,
                 env: dict[str, str] | None = None):
    """The Ray actor class of an engine host: a "health" thread for pings, restartable (in its bundle)."""
    extra = {"runtime_env": {"env_vars": env}} if env else {}
    return ray.remote(concurrency_groups={"health": 1})(cls).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts, max_task_retries=0,
        scheduling_strategy=scheduling_strategy, **extra)


def engine_layout(spec: EngineSpec) -> tuple[int, Callable[[list[int]], dict[str, str]] | None]:
    """(ranks per replica, bundle indices -> the host's environment) for an engine whose ranks are Ray
    actors of its own (its class has `bundle_env`, e.g. trtllm); (0, None) for an engine that runs inside
    its host actor."""
    bundle_env = getattr(engine_class(spec.kind), "bundle_env", None)
    return (spec.tensor_parallel, bundle_env) if bundle_env is not None else (0, None)


@dataclass
class EnginePool:
    """Replicas of one kind (generators or judges). Indexable like the list of actor handles."""

    name: str
    actors: list
    max_restarts: int
    timeout_s: float = 60.0  # how long a restarting replica (or a refit call) may take to answer
    log: Callable[[str], None] = print
    follows_policy: bool = True  # serves M_t: refit with the learner, its outputs held to the current version
    restarts: list[int] = field(default_factory=list)
    version: int = 0  # the weight version every replica must serve
    weight_refs: tuple = ()  # the buckets of `version` (empty: the weights the replicas were created with)
    ranks_per_replica: int = 1  # ranks each replica takes in a collective refit group (trtllm: tensor_parallel)
    # How a restarted replica gets `version` when the pool keeps no buckets (the collective transport sets
    # it: orchestration/refit.py); None: load `weight_refs`.
    restore: Callable[["EnginePool", int], None] | None = None

    def __post_init__(self):
        self.restarts = [0] * len(self.actors)
        self.incarnations: list[str | None] = [None] * len(self.actors)  # of each replica's process, once seen
        self.created_version = self.version  # what a restarted replica comes back with

    def __len__(self) -> int:
        return len(self.actors)

    def __iter__(self):
        return iter(self.actors)

    @property
    def total_restarts(self) -> int:
        return sum(self.restarts)

    def call(self, replica: int, method: str, *args):
        return getattr(self.actors[replica], method).remote(*args)

    def recover(self, replica: int, error: Exception) -> None:
        """Wait for a replica Ray is restarting and bring it to the current weights; ReplicaFailed when it
        has failed more than max_restarts times."""
        if self.await_restart(replica, error) != self.version:  # restarted: the spec's weights (-1 until confirmed)
            if self.restore is not None:
                self.restore(self, replica)
            else:
                get_within(self.actors[replica].load_weights.remote(self.version, *self.weight_refs), self.timeout_s,
                           f"{self.name} replica {replica} loading weight version {self.version} after its restart")

    def await_restart(self, replica: int, error: Exception, then: str = "re-issuing its work") -> int:
        """Count a failure of `replica` against max_restarts and wait until it answers; its weight version.
        `then` says in the log what happens next."""
        self.note_restart(replica, one_line(error), then)
        actor = self.actors[replica]
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self.incarnations[replica], version = ray.get(actor.status.remote(),
                                                              timeout=max(1.0, deadline - time.monotonic()))
                return version
            except (GetTimeoutError, *RECOVERABLE) as e:
                if time.monotonic() > deadline:
                    raise ReplicaFailed(f"{self.name} replica {replica} did not come back within "
                                        f"{self.timeout_s:.0f}s after a crash: {e}") from None
                time.sleep(0.5)

    def note_restart(self, replica: int, cause: str, then: str) -> None:
        """Count and log one failure of `replica`; ReplicaFailed beyond cluster.max_restarts."""
        self.restarts[replica] += 1
        if self.restarts[replica] > self.max_restarts:
            raise ReplicaFailed(f"{self.name} replica {replica} failed {self.restarts[replica]} times, more than "
                                f"cluster.max_restarts={self.max_restarts} allows; last error: {cause}"
                                + memory_hint(self.name, cause))
        self.log(f"[cluster] {self.name} replica {replica} died ({cause}); restart "
                 f"{self.restarts[replica]}/{self.max_restarts}, {then}")

    def call_failed(self, replica: int, method: str, error: Exception) -> ReplicaFailed:
        """The error to stop the run with when a call failed in the replica's own code (not by its death)."""
        cause = f"{type(error).__name__}: {one_line(error)}"
        return ReplicaFailed(f"{self.name} replica {replica} failed in {method} ({cause})"
                             + memory_hint(self.name, cause))

    def note_idle_restarts(self) -> None:
        """Count and log the replicas Ray restarted while they had no call in flight: such a death fails no
        call, so nothing else would. A replica's incarnation changes with every process Ray starts for it."""
        refs = [actor.status.remote() for actor in self.actors]
        for i, ref in enumerate(refs):
            try:
                incarnation, _ = get_within(ref, self.timeout_s, f"{self.name} replica {i} reporting its status")
            except RECOVERABLE:
                continue  # dead now: the call that needs it fails, and its recovery counts it
            self.note_incarnation(i, incarnation, "giving it the current weights")

    def note_incarnation(self, replica: int, incarnation: str, then: str) -> None:
        """Remember the process a replica answered from; a new one is a restart Ray made while it was idle."""
        known, self.incarnations[replica] = self.incarnations[replica], incarnation
        if known is not None and known != incarnation:
            self.note_restart(replica, "restarted by Ray while idle", then)

    def load(self, version: int, refs: list) -> None:
        """Refit every replica to `version`; a replica that dies meanwhile is recovered (and so refit)."""
        self.note_idle_restarts()
        self.version, self.weight_refs = version, tuple(refs)
        pending = {i: actor.load_weights.remote(version, *refs) for i, actor in enumerate(self.actors)}
        for i, ref in pending.items():
            what = f"{self.name} replica {i} loading weight version {version}"
            try:
                loaded = get_within(ref, self.timeout_s, what)
            except RECOVERABLE as e:
                self.recover(i, e)
                loaded = get_within(self.actors[i].weight_version.remote(), self.timeout_s, what)
            if loaded != version:
                raise RefitFailed(f"refit of {self.name} replica {i} to version {version} failed: it reports {loaded}")

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


@dataclass
class Pools:
    generators: EnginePool
    judges: EnginePool  # empty when the algorithm has no judge (SPIN, generation)
    learner: LearnerGroup | None  # None for the generation job
    health_interval_s: float = 30.0
    health_timeout_s: float = 60.0
    placement_groups: list = field(default_factory=list)
    # The refit transport's state when weights do not go through the object store: the collective group
    # (orchestration/refit.py) or the CUDA IPC export (orchestration/ipc_refit.py); None: object store
    collective: Any = None
    _last_progress: float = field(default_factory=time.monotonic)

    @property
    def engine_pools(self) -> list[EnginePool]:
        """Every pool in use (health checks, restarts)."""
        return [p for p in (self.generators, self.judges) if len(p)]

    @property
    def policy_pools(self) -> list[EnginePool]:
        """The pools that serve M_t: the only ones refit (a fixed judge keeps its own weights)."""
        return [p for p in self.engine_pools if p.follows_policy]

    def generate(self, requests: list) -> list:
        """Results of `requests` spread over the generator replicas, in request order, awaited with health
        checks; a share whose replica died is issued again (same seeds) once the replica is back."""
        share = -(-len(requests) // len(self.generators)) if requests else 0
        shares = {i: requests[i * share : (i + 1) * share] for i in range(len(self.generators))}
        calls = {i: self.generators.call(i, "generate", part) for i, part in shares.items() if part}
        results: dict[int, list] = {}
        while calls:
            ready = self.wait(list(calls.values()))
            for i, ref in list(calls.items()):
                if ref not in ready:
                    continue
                try:
                    results[i] = ray.get(ref).results
                    del calls[i]
                except RECOVERABLE as e:
                    self.generators.recover(i, e)
                    calls[i] = self.generators.call(i, "generate", shares[i])
                except RayError as e:
                    raise self.generators.call_failed(i, "generate", e) from None
        return [r for i in sorted(results) for r in results[i]]

    @property
    def actor_restarts(self) -> int:
        return sum(p.total_restarts for p in self.engine_pools)

    def wait(self, refs: list, timeout_s: float = 1.0) -> set:
        """ray.wait for one of `refs`, at most `timeout_s`; with no progress for cluster.health_check_interval_s,
        ping every actor: a hung replica is killed so Ray restarts it, a dead or hung learner stops the run."""
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s) if refs else ([], [])
        now = time.monotonic()
        if ready:
            self._last_progress = now
        elif now - self._last_progress > self.health_interval_s:
            self.health_check()
            self._last_progress = time.monotonic()
        return set(ready)

    def get(self, refs):
        """ray.get of learner calls with health checks while waiting; a failed call stops the run at once."""
        pending = list(refs) if isinstance(refs, list) else [refs]
        while True:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            raise_learner_failures(done)
            if not pending:
                return ray.get(refs)
            self.wait(pending)

    def health_check(self) -> None:
        engines = [(pool, i, pool.actors[i].ping.remote()) for pool in self.engine_pools for i in range(len(pool))]
        learner = self.learner.ping_refs() if self.learner is not None else []
        refs = [ref for _, _, ref in engines] + learner
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.health_timeout_s)
        done = set(done)
        for rank, ref in enumerate(learner):
            if ref not in done:
                raise LearnerFailed(f"learner worker {rank} did not answer a health check within "
                                    f"{self.health_timeout_s:.0f}s (cluster.health_check_timeout_s)")
            try:
                ray.get(ref)
            except RECOVERABLE as e:
                raise LearnerFailed(f"learner worker {rank} died: {e}") from None
        for pool, i, ref in engines:
            if ref not in done:  # alive but not answering: restart it; its pending call fails and is re-issued
                pool.log(f"[cluster] {pool.name} replica {i} did not answer a health check within "
                         f"{self.health_timeout_s:.0f}s; killing it so Ray restarts it")
                ray.kill(pool.actors[i], no_restart=False)

    def shutdown(self) -> None:
        for pool in (self.generators, self.judges):
            pool.shutdown()
        if self.learner is not None:
            self.learner.shutdown()
        placement.release(self.placement_groups)


@dataclass(frozen=True)
class JudgePoolSpec:
    """The judge pool: its backend (`judge.backend`), how it judges, and the engine it hosts if it has one."""

    backend: str
    judge: JudgeSpec
    engine: EngineSpec | None = None
    backend_args: tuple = ()  # what a backend without a local engine takes after the JudgeSpec (triton: TritonSpec)


def start_pools(cluster: ClusterConfig, gen_engine: EngineSpec, judges: JudgePoolSpec | None = None,
                learner: LearnerSpec | None = None, log=print) -> Pools:
    """Reserve a placement group per pool, then start the generator pool, and the judge pool and learner
    group when given their specs. PlacementError (with the numbers) when the cluster cannot hold them."""
    # Engines whose ranks are Ray actors of their own (trtllm) get one bundle per rank (engine_layout).
    layouts = {"cluster.generators": engine_layout(gen_engine)}
    if judges is not None and judges.engine is not None:
        layouts["cluster.judges"] = engine_layout(judges.engine)
    engines = [gen_engine] + ([judges.engine] if judges is not None and judges.engine is not None else [])
    for kind in dict.fromkeys(spec.kind for spec in engines):  # what an engine cannot promise, in the run log
        warning = getattr(engine_class(kind), "START_WARNING", None)
        if warning:
            log(f"[run] warning: {warning}")
    wanted = placement.requests(cluster, judges=judges is not None, learner=learner is not None,
                                engine_ranks={key: ranks for key, (ranks, _) in layouts.items() if ranks})
    if not cluster.wait_for_autoscaler:
        placement.check_fits(wanted, *placement.cluster_capacity())
    groups: dict[str, object] = {}
    try:
        for request in wanted:
            groups[request.name] = placement.reserve(request, cluster.placement_timeout_s)
    except Exception:
        placement.release(list(groups.values()))
        raise

    def replicas(cls, pool, key: str, *args) -> list:
        ranks, bundle_env = layouts.get(key, (0, None))
        if not ranks:
            return [engine_actor(cls, num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, max_restarts=cluster.max_restarts,
                                 scheduling_strategy=placement.in_bundle(groups[key], i)).remote(*args)
                    for i in range(pool.replicas)]
        # The host takes nothing of its bundles: its engine's rank workers (one GPU and one CPU each, Ray's
        # default for an actor that asks for a GPU) and their helpers take bundles i*ranks .. i*ranks+ranks-1.
        return [engine_actor(cls, num_cpus=0, num_gpus=0, max_restarts=cluster.max_restarts,
                             scheduling_strategy=placement.in_bundle(groups[key], i * ranks, capture_children=True),
                             env=bundle_env(list(range(i * ranks, (i + 1) * ranks)))).remote(*args)
                for i in range(pool.replicas)]

    generators = replicas(GeneratorActor, cluster.generators, "cluster.generators", gen_engine)
    judge_actors, judge_version, follows = [], gen_engine.weight_version, True
    if judges is not None:
        entry = judge_backend(judges.backend)
        args = (judges.engine, judges.judge) if entry.local_engine else (judges.judge, *judges.backend_args)
        judge_actors = replicas(entry.actor_class(), cluster.judges, "cluster.judges", *args)
        follows = entry.follows_policy
        judge_version = judges.engine.weight_version if judges.engine is not None else 0
    ranks = {key: max(1, r) for key, (r, _) in layouts.items()}
    pools = Pools(EnginePool("generator", generators, cluster.max_restarts, cluster.health_check_timeout_s, log,
                             version=gen_engine.weight_version, ranks_per_replica=ranks["cluster.generators"]),
                  EnginePool("judge", judge_actors, cluster.max_restarts, cluster.health_check_timeout_s, log,
                             follows_policy=follows, version=judge_version,
                             ranks_per_replica=ranks.get("cluster.judges", 1)),
                  None, cluster.health_check_interval_s, cluster.health_check_timeout_s, list(groups.values()))
    if learner is not None:
        try:
            pools.learner = LearnerGroup(learner, [placement.in_bundle(groups["cluster.learner"], r)
                                                   for r in range(learner.workers)], wait=pools.get,
                                         setup_timeout_s=START_TIMEOUT_S)
        except SetupTimeout as e:
            raise LearnerFailed(str(e)) from None
    # Engines loaded (a replica that cannot load its model fails here, with its error).
    for pool in pools.engine_pools:
        for i in range(len(pool)):
            pool.incarnations[i], _ = get_within(pool.call(i, "status"), START_TIMEOUT_S,
                                                 f"{pool.name} replica {i} loading its model")
    log("[cluster] placed " + "; ".join(r.describe() for r in wanted))
    for pool in pools.engine_pools:
        plan = get_within(pool.call(0, "memory_plan"), cluster.health_check_timeout_s, f"{pool.name} replica 0")
        if plan:
            log(f"[cluster] {pool.name} replica: {plan}")
    return pools
