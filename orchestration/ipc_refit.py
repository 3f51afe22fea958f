"""The CUDA IPC refit transport (`cluster.refit_transport=cuda_ipc`, docs/refit.md): for pools that share
the learner's GPU (the one-GPU layout), where NCCL cannot put two ranks on one device and the object store
takes the weights through host memory.

Learner rank 0 exports its weights once through CUDA IPC handles (learner/ipc_source.py): live (the torch
backend: the engines map the learner's own weights) or staged (megatron, fsdp2: a flat buffer the learner
packs into at each refit, one more call and one more copy). A live refit is then one Ray call per engine
replica, all at once, naming the export by its token: each copies the weights straight from the learner's
memory, after waiting on the GPU for the learner's last step (actors/ipc_receiver.py), and answers with its
status, so an idle restart is seen in the same call (a restarted process has mapped nothing and is sent the
export itself). No byte goes through the host.

A replica Ray restarts during a refit copies the weights like the others (the learner is idle then). One that
restarts later is restored from a healthy replica serving its version, as the collective transport does (the
learner may have trained past that version), or, staged, from the learner's buffer, which keeps the last
refit's weights until the next one.
"""

from __future__ import annotations

from actors.ipc_receiver import NotMapped, NotOnLearnersGpu

from .cluster import RECOVERABLE, EnginePool, Pools, get_within
from .errors import ConfigError, LearnerFailed, RefitFailed, one_line
from .refit import copy_from_peer


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
        self.export: dict = {}  # the learner's export (check() gets it): what the engines map
        self.version: int | None = None  # the weight version of the last refit
        self.refitting = False  # inside refit(): the learner is idle, its live weights are `version`

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
        self.export = export
        mb = sum(entry["nbytes"] for entry in export["layout"]) / 1e6
        what = ("its live weights" if export["live"]
                else f"its staging buffer (in {self.dtype or 'the learner dtypes'})")
        self.log(f"[refit] cuda_ipc: learner rank 0's {what}, {mb:.1f} MB, mapped by {len(self.engines)} engine "
                 "replica(s) on its GPU")

    def refit(self, version: int, bucket_bytes: int = 0) -> None:
        """`bucket_bytes` is the other transports'; here the weights travel as the learner laid them out."""
        if not self.export["live"]:
            self.export = self._export()  # pack into the staging buffer
        self.version, self.refitting = version, True
        try:
            for pool in self.pools.policy_pools:
                pool.version, pool.weight_refs = version, ()
            # the token alone: each replica mapped the export at set-up (a restarted one asks for it below)
            token = self.export["token"]
            loads = [(pool, i, pool.call(i, "load_ipc", version, token)) for pool, i in self.engines]
            for pool, i, ref in loads:
                what = f"{pool.name} replica {i} copying weight version {version} over CUDA IPC"
                try:
                    try:
                        incarnation, got = get_within(ref, pool.timeout_s, what)
                    except NotMapped:  # a process Ray restarted while idle: it maps the export now
                        incarnation, got = get_within(pool.call(i, "load_ipc", version, self.export), pool.timeout_s,
                                                      what)
                    pool.note_incarnation(i, incarnation, "it took this refit's weights")
                except RECOVERABLE as e:
                    pool.recover(i, e)  # restarted: restore() copies the weights again
                    got = get_within(pool.actors[i].weight_version.remote(), pool.timeout_s, what)
                if got != version:
                    raise RefitFailed(f"refit of {pool.name} replica {i} to version {version} failed: it reports {got}")
        finally:
            self.refitting = False

    def restore(self, pool: EnginePool, replica: int) -> None:
        """Bring a restarted replica to the version its pool serves (EnginePool.recover calls this)."""
        actor = pool.actors[replica]
        what = f"{pool.name} replica {replica} restoring weight version {pool.version} after a restart"
        if pool.version == pool.created_version:  # no refit since it was created: its own weights are current
            loaded = get_within(actor.load_weights.remote(pool.version), pool.timeout_s, what)
        elif self.version == pool.version and (self.refitting or not self.export["live"]):
            # the learner's exported memory holds `version`: during a refit (live), or its staging buffer
            _, loaded = get_within(actor.load_ipc.remote(pool.version, self.export), pool.timeout_s, what)
            self.log(f"[refit] {pool.name} replica {replica} restored to version {pool.version} from the learner's "
                     "CUDA IPC export")
        elif self.export["live"]:
            loaded = copy_from_peer(self.pools, pool, replica, self.log, "live cuda_ipc")
        else:  # streaming refits moved the pool on through the object store: that path restores it
            raise RefitFailed(f"{what}: the learner's buffer holds version {self.version}")
        if loaded != pool.version:
            raise RefitFailed(f"{pool.name} replica {replica} reports version {loaded} after its restore "
                              f"to {pool.version}")
