"""Weight refit: the learner's weights become version v in every generator and judge replica.

Two transports (`cluster.refit_transport`, docs/refit.md):
- object store: learner rank 0 packs its weights into flat buckets and puts each in Ray's object store once;
  every replica copies them in from a zero-copy view. The pools keep the bucket refs until the next refit,
  for replicas that restart in between. The CPU path.
- collective (`nccl` on GPUs; `gloo` runs the same code on CPU): one process group over learner rank 0
  (the source, rank 0) and every generator and judge replica (ranks 1..n, generators first). The source
  computes the bucket layout once per group; every engine validates it and allocates its receive buffers
  before anything is sent. A refit is then one broadcast per bucket, straight from the learner's device
  into the engines' (learner/refit_source.py, actors/refit_receiver.py).

A replica that Ray restarts is in no group. Before each refit every replica reports the group generation it
is in; a mismatch (a restart) or a failed refit rebuilds the group everywhere under a new generation, which
keys its rendezvous apart from the old one (a new bucket size only lays the buckets out again). The restarted replica itself gets the
current version at once, without the learner (which may have trained further): a healthy replica serving
that version exports its weights through the object store and the restarted one loads them; with no such
peer the run stops with ReplicaFailed (and resumes from its last checkpoint).
"""

from __future__ import annotations

import ray
from ray.exceptions import GetTimeoutError

from refit_wire import DEFAULT_BUCKET_BYTES

from .cluster import RECOVERABLE, EnginePool, Pools, get_within
from .errors import ConfigError, LearnerFailed, RefitFailed, ReplicaFailed, one_line

COLLECTIVE_BACKENDS = ("nccl", "gloo")


def refit(pools: Pools, version: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Publish the learner's weights as `version` and wait until every engine serves it."""
    if pools.collective is not None:
        pools.collective.refit(version, bucket_bytes)
        return
    refs = pools.learner.export_bucket_refs(bucket_bytes)
    for pool in pools.policy_pools:
        pool.load(version, refs)


def use_collective(pools: Pools, backend: str, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> "CollectiveRefit":
    """Switch `pools` to the collective transport and build its group now, so that a set-up problem stops
    the run at start-up rather than at its first refit."""
    collective = CollectiveRefit(pools, backend)
    collective.build(bucket_bytes)
    pools.collective = collective
    for pool in pools.policy_pools:
        pool.restore = collective.restore  # the pools keep no buckets to reload
    return collective


class CollectiveRefit:
    """The collective transport's state: the group's generation and the layout its members hold."""

    def __init__(self, pools: Pools, backend: str):
        if backend not in COLLECTIVE_BACKENDS:
            raise ConfigError(f"cluster.refit_transport={backend!r}: the collective transports are "
                              f"{', '.join(COLLECTIVE_BACKENDS)}")
        if pools.learner is None or not pools.policy_pools:
            raise ConfigError(f"cluster.refit_transport={backend} needs a learner group (its rank 0 is the source) "
                              "and a pool that follows the policy")
        self.pools, self.backend = pools, backend
        self.log = pools.generators.log
        self.generation = 0  # of the group every member is in; 0: none yet
        self.bucket_bytes = 0  # of the layout every member holds
        self.wire_dtype: str | None = None  # the dtype buckets travel in (None: each weight's own)
        self.intact = False  # False after a failed build or refit: the next refit rebuilds

    @property
    def engines(self) -> list[tuple[EnginePool, int]]:
        """(pool, replica) of every engine member, in rank order (rank = index + 1): the pools that follow the
        policy (a fixed judge is never refit, so it is not in the group)."""
        return [(pool, i) for pool in self.pools.policy_pools for i in range(len(pool))]

    def refit(self, version: int, bucket_bytes: int) -> None:
        for pool in self.pools.policy_pools:
            pool.note_idle_restarts()  # a restart while idle failed no call: count and log it here
        if not (self.intact and self._members_in_group()):
            self.build(bucket_bytes)
        elif bucket_bytes != self.bucket_bytes:
            self._lay_out(bucket_bytes)
        engines = self.engines
        sends = self.pools.learner.send_weights()
        refs = sends + [pool.call(i, "receive_weights", version) for pool, i in engines]
        loaded = self._gather(refs, f"the refit to version {version}")[len(sends):]
        for (pool, i), got in zip(engines, loaded):
            if got != version:
                raise RefitFailed(f"refit of {pool.name} replica {i} to version {version} failed: it reports {got}")
        for pool in self.pools.policy_pools:
            pool.version, pool.weight_refs = version, ()

    def build(self, bucket_bytes: int) -> None:
        """(Re)create the group: every member leaves the old one and all join a new generation together;
        then the layout for `bucket_bytes`."""
        learner, engines = self.pools.learner, self.engines
        self.intact = False
        # Leaving first frees the old communicators (a restarted replica has none to free).
        self._gather([learner.leave_refit_group()] + [pool.call(i, "leave_refit_group") for pool, i in engines],
                     f"the teardown of refit group {self.generation}")
        host, port = learner.refit_address()
        self.generation += 1
        first, size = member_ranks([pool.ranks_per_replica for pool, _ in engines])
        joins = [learner.join_refit_group(self.generation, size, self.backend)]
        joins += [pool.call(i, "join_refit_group", host, port, self.generation, rank, size, self.backend)
                  for rank, (pool, i) in zip(first, engines)]
        dtypes = self._gather(joins, f"the set-up of refit group {self.generation}")[1:]
        # Send in the engines' dtype (half the bytes of float32 master weights); mixed engines cast on unpack.
        self.wire_dtype = dtypes[0] if len(set(dtypes)) == 1 else None
        self._lay_out(bucket_bytes)

    def _lay_out(self, bucket_bytes: int) -> None:
        """The source computes the layout; every engine validates it and allocates its receive buffers."""
        self.intact = False
        layout = self.pools.learner.refit_layout(bucket_bytes, self.wire_dtype)
        engines = self.engines
        prepared = [(pool, i, pool.call(i, "prepare_refit", layout)) for pool, i in engines]
        for pool, i, ref in prepared:
            try:
                get_within(ref, pool.timeout_s, f"{pool.name} replica {i} preparing refit group {self.generation}")
            except ValueError as e:  # a layout that does not fit this engine's model: nothing was sent
                raise RefitFailed(f"{pool.name} replica {i} rejected the refit layout: {one_line(e)}") from None
        self.bucket_bytes, self.intact = bucket_bytes, True
        ranks = sum(pool.ranks_per_replica for pool, _ in engines)
        self.log(f"[refit] {self.backend} group {self.generation}: learner rank 0 + {len(engines)} engine "
                 f"replica(s) ({ranks} rank(s)), {len(layout)} bucket(s) of up to {bucket_bytes / 2**20:g} MiB, "
                 f"{sum(b['nbytes'] for b in layout) / 1e6:.1f} MB in {self.wire_dtype or 'the learner dtypes'}")

    def restore(self, pool: EnginePool, replica: int) -> None:
        """Bring a restarted replica to the version its pool serves (EnginePool.recover calls this). It is in
        no group now; the next refit notices and rebuilds."""
        actor = pool.actors[replica]
        if pool.version == pool.created_version:  # no refit since it was created: its own weights are current
            loaded = get_within(actor.load_weights.remote(pool.version), pool.timeout_s,
                                f"{pool.name} replica {replica} confirming its weights after a restart")
        else:
            loaded = copy_from_peer(self.pools, pool, replica, self.log, self.backend)
        if loaded != pool.version:
            raise RefitFailed(f"{pool.name} replica {replica} reports version {loaded} after its restore "
                               f"to {pool.version}")

    def _members_in_group(self) -> bool:
        """Whether every engine is in the current group (a replica Ray restarted reports none). One found dead
        is waited for and counted against cluster.max_restarts, as a failed call would be; the rebuilt group's
        broadcast then gives it the new weights."""
        intact = True
        refs = [pool.call(i, "refit_group") for pool, i in self.engines]
        for (pool, i), ref in zip(self.engines, refs):
            try:
                got = get_within(ref, pool.timeout_s, f"{pool.name} replica {i} reporting its refit group")
            except RECOVERABLE as e:
                pool.await_restart(i, e, then="the refit rebuilds the group and gives it the new weights")
                intact = False
                continue
            intact &= got == self.generation
        return intact

    def _gather(self, refs: list, what: str) -> list:
        """Results of one call per member (the learner's first), with health checks while waiting. Every
        member takes part in the same collective, so one failure fails them all: raise at once."""
        pending = list(refs)
        while pending:
            for ref in self.pools.wait(pending):
                pending.remove(ref)
                try:
                    ray.get(ref)
                except Exception as e:
                    self.intact = False
                    member = refs.index(ref)
                    if member == 0:
                        raise LearnerFailed(f"learner rank 0 failed in {what}: {one_line(e)}") from None
                    pool, i = self.engines[member - 1]
                    raise ReplicaFailed(f"{pool.name} replica {i} failed in {what} over {self.backend} "
                                        f"({one_line(e)}); the other members cannot finish the collective "
                                        "without it, so the run stops: resume from the last checkpoint") from None
        return ray.get(refs)


def member_ranks(ranks_per_replica: list[int]) -> tuple[list[int], int]:
    """(each replica's first rank, the group's size) for replicas taking these many ranks each, in order
    after the source (rank 0): a replica with tensor-parallel workers takes one rank per worker."""
    first, next_rank = [], 1
    for n in ranks_per_replica:
        first.append(next_rank)
        next_rank += n
    return first, next_rank


def copy_from_peer(pools: Pools, pool: EnginePool, replica: int, log, transport: str) -> int:
    """Give a restarted replica the version its pool serves from a healthy replica serving it (through the
    object store), for transports that keep no copy of their own; the version it then reports. ReplicaFailed
    when no replica serves that version."""
    peers = [(pool, j) for j in range(len(pool)) if j != replica]
    # Only pools that serve M_t hold the policy's weights (a fixed judge's are another model).
    peers += [(other, j) for other in pools.policy_pools if other is not pool for j in range(len(other))]
    for peer, j in peers:
        if peer.version != pool.version:
            continue
        try:
            version, refs = ray.get(peer.call(j, "export_weights", DEFAULT_BUCKET_BYTES), timeout=peer.timeout_s)
        except (GetTimeoutError, *RECOVERABLE):
            continue  # not healthy now
        if version == pool.version:
            loaded = get_within(pool.actors[replica].load_weights.remote(version, *refs), pool.timeout_s,
                                f"{pool.name} replica {replica} loading weights from {peer.name} replica {j}")
            log(f"[refit] {pool.name} replica {replica} restored to version {version} from {peer.name} replica {j}")
            return loaded
    raise ReplicaFailed(f"{pool.name} replica {replica} restarted and no healthy replica serves weight version "
                        f"{pool.version} to copy it from (the {transport} refit keeps no copy of its own, "
                        "and the learner may have trained past that version): resume from the last checkpoint")
