"""The CUDA IPC refit transport (`cluster.refit_transport=cuda_ipc`, docs/refit.md): for pools that share
the learner's GPU (the one-GPU layout), where NCCL cannot put two ranks on one device and the object store
takes the weights through host memory.

Each refit: learner rank 0 packs its weights into one flat buffer on its GPU, in the engines' dtype
(learner/ipc_source.py), and every engine replica copies them from that buffer, mapped through a CUDA IPC
handle (actors/ipc_receiver.py): two device-to-device copies and two Ray calls, no host round trip. The
buffer keeps the last refit's weights until the next one, so a replica Ray restarts is brought back to the
version its pool serves by copying from it again.
"""

from __future__ import annotations

from actors.ipc_receiver import NotOnLearnersGpu

from .cluster import RECOVERABLE, EnginePool, Pools, get_within
from .errors import ConfigError, LearnerFailed, RefitFailed, one_line


class IpcUnavailable(RefitFailed):
    """An engine replica is on another GPU than learner rank 0: CUDA IPC cannot reach it."""


def use_cuda_ipc(pools: Pools) -> "IpcRefit":
    """Switch `pools` to the CUDA IPC transport and check it now (every engine on the learner's GPU, the layout
    fitting every engine), so that a set-up problem stops the run at start-up, not at its first refit."""
    ipc = IpcRefit(pools)
    ipc.check()
    pools.collective = ipc  # the transport refit() hands each refit to
    for pool in pools.policy_pools:
        pool.restore = ipc.restore  # the pools keep no buckets to reload
    return ipc


class IpcRefit:
    def __init__(self, pools: Pools):
        if pools.learner is None or not pools.policy_pools:
            raise ConfigError("cluster.refit_transport=cuda_ipc needs a learner group (its rank 0 exports the "
                              "weights) and a pool that follows the policy")
        self.pools = pools
        self.log = pools.generators.log
        dtypes = {get_within(pool.call(i, "refit_dtype"), pool.timeout_s, f"{pool.name} replica {i}")
                  for pool, i in self.engines}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else None  # mixed engines cast on copy
        self.export: dict | None = None  # the last export: what the learner's buffer holds
        self.version: int | None = None  # ... and the weight version it is

    @property
    def engines(self) -> list[tuple[EnginePool, int]]:
        return [(pool, i) for pool in self.pools.policy_pools for i in range(len(pool))]

    def _export(self) -> dict:
        refs = self.pools.learner.ipc_export(self.dtype)
        try:
            return self.pools.learner.wait(refs)[0]
        except Exception as e:
            raise LearnerFailed(f"learner rank 0 failed to export its weights over CUDA IPC: {one_line(e)}") from None

    def check(self) -> None:
        """Map the learner's buffer in every engine without loading it (the engines keep what they serve: on a
        resume the learner may hold weights trained past that version)."""
        export = self._export()
        for pool, i in self.engines:
            try:
                get_within(pool.call(i, "check_ipc", export), pool.timeout_s, f"{pool.name} replica {i} mapping "
                           "the learner's weight buffer")
            except NotOnLearnersGpu as e:
                raise IpcUnavailable(f"{pool.name} replica {i} cannot take CUDA IPC refits: {one_line(e)}") from None
            except ValueError as e:
                raise RefitFailed(f"{pool.name} replica {i} cannot take CUDA IPC refits: {one_line(e)}") from None
        mb = sum(entry["nbytes"] for entry in export["layout"]) / 1e6
        self.log(f"[refit] cuda_ipc: learner rank 0's buffer ({mb:.1f} MB in {self.dtype or 'the learner dtypes'}) "
                 f"mapped by {len(self.engines)} engine replica(s) on its GPU")

    def refit(self, version: int, bucket_bytes: int = 0) -> None:
        """`bucket_bytes` is the other transports'; here the weights travel as one buffer."""
        for pool in self.pools.policy_pools:
            pool.note_idle_restarts()
        self.export, self.version = self._export(), version
        for pool in self.pools.policy_pools:
            pool.version, pool.weight_refs = version, ()
        loads = [(pool, i, pool.call(i, "load_ipc", version, self.export)) for pool, i in self.engines]
        for pool, i, ref in loads:
            what = f"{pool.name} replica {i} copying weight version {version} over CUDA IPC"
            try:
                got = get_within(ref, pool.timeout_s, what)
            except RECOVERABLE as e:
                pool.recover(i, e)  # restarted: restore() copies the buffer, which holds `version` now
                got = get_within(pool.actors[i].weight_version.remote(), pool.timeout_s, what)
            if got != version:
                raise RefitFailed(f"refit of {pool.name} replica {i} to version {version} failed: it reports {got}")

    def restore(self, pool: EnginePool, replica: int) -> None:
        """Bring a restarted replica to the version its pool serves (EnginePool.recover calls this)."""
        actor = pool.actors[replica]
        what = f"{pool.name} replica {replica} restoring weight version {pool.version} after a restart"
        if pool.version == pool.created_version:  # no refit since it was created: its own weights are current
            loaded = get_within(actor.load_weights.remote(pool.version), pool.timeout_s, what)
        elif self.version == pool.version:
            loaded = get_within(actor.load_ipc.remote(pool.version, self.export), pool.timeout_s, what)
            self.log(f"[refit] {pool.name} replica {replica} restored to version {pool.version} from the learner's "
                     "CUDA IPC buffer")
        else:  # streaming refits moved the pool on through the object store: that path restores it
            raise RefitFailed(f"{what}: the learner's buffer holds version {self.version}")
        if loaded != pool.version:
            raise RefitFailed(f"{pool.name} replica {replica} reports version {loaded} after its restore "
                              f"to {pool.version}")
