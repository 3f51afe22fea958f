"""Weight refit through the object store: the learner's weights land in every engine, with the version."""

import time

import pytest
import ray

from actors.engines import EngineSpec
from actors.engines.protocol import GenerationRequest, SamplingParams
from actors.generator import GeneratorActor
from learner.group import LearnerGroup, LearnerSpec
from learner.types import LossConfig, OptimConfig, TrainSample
from orchestration.cluster import RECOVERABLE, EnginePool, Pools, ReplicaFailed, engine_actor
from orchestration.refit import refit

pytestmark = pytest.mark.slow


def test_refit_copies_trained_weights_into_every_engine(ray_session, tiny_llama):
    group = LearnerGroup(LearnerSpec(model_dir=tiny_llama, optim=OptimConfig(lr=1e-2, micro_batch_size=2), workers=2))
    engine = EngineSpec(model_dir=tiny_llama, max_batch_size=4)
    actors = [engine_actor(GeneratorActor, num_cpus=0.5, num_gpus=0).remote(engine) for _ in range(2)]
    pools = Pools(EnginePool("generator", actors, max_restarts=0), EnginePool("judge", [], max_restarts=0), group)

    before = ray.get(actors[0].weight_digest.remote())
    assert before == group.weight_digest()
    batch = [TrainSample([2, 3], [4, 5], [6, 7]), TrainSample([8], [9, 10], [11])] * 2
    ray.get(group.train_step_async(batch, LossConfig(beta=0.5)))
    trained = group.weight_digest()
    assert trained != before

    refit(pools, version=1, bucket_bytes=2048)  # small buckets: several per refit
    for actor in actors:
        assert ray.get(actor.weight_digest.remote()) == trained
        out = ray.get(actor.generate.remote([GenerationRequest([2, 3], SamplingParams(temperature=0, max_new_tokens=3))]))
        assert out.results[0].weight_version == 1
    group.shutdown()
    for a in actors:
        ray.kill(a)


def test_a_replica_over_its_restart_budget_stops_with_a_message(ray_session, tiny_llama):
    """Ray restarts a dead replica; the pool brings it to the current version, and a failure beyond
    cluster.max_restarts raises ReplicaFailed naming the replica (the run then checkpoints and stops)."""
    engine = EngineSpec(model_dir=tiny_llama, max_batch_size=4)
    actor = engine_actor(GeneratorActor, num_cpus=0.5, num_gpus=0, max_restarts=1).remote(engine)
    logs = []
    pool = EnginePool("generator", [actor], max_restarts=1, log=logs.append)
    group = LearnerGroup(LearnerSpec(model_dir=tiny_llama, optim=OptimConfig(lr=1e-2, micro_batch_size=2), workers=1))
    refit(Pools(pool, EnginePool("judge", [], max_restarts=1), group), version=3, bucket_bytes=4096)
    request = [GenerationRequest([2, 3], SamplingParams(temperature=0, max_new_tokens=2))]

    def die():
        """Kill the replica like a crash (Ray may restart it) and wait until that has happened: ray.kill is
        asynchronous, so a call sent right after it could still be served by the old process."""
        ray.kill(actor, no_restart=False)
        while True:
            try:
                if ray.get(actor.weight_version.remote(), timeout=30) == -1:
                    return  # restarted, waiting for weights
            except (*RECOVERABLE, ray.exceptions.GetTimeoutError):
                return  # dead or restarting
            time.sleep(0.05)

    die()
    with pytest.raises(RECOVERABLE) as first:
        ray.get(pool.call(0, "generate", request))
    pool.recover(0, first.value)  # restarted with version 0 weights, brought back to version 3
    assert ray.get(actor.weight_version.remote()) == 3
    assert ray.get(pool.call(0, "generate", request)).results[0].weight_version == 3
    assert "generator replica 0 died" in logs[0] and "restart 1/1" in logs[0]
    die()
    with pytest.raises(RECOVERABLE) as second:
        ray.get(pool.call(0, "generate", request))
    with pytest.raises(ReplicaFailed, match="generator replica 0 failed 2 times.*cluster.max_restarts=1"):
        pool.recover(0, second.value)
    group.shutdown()
    pool.shutdown()


@pytest.mark.parametrize("transport", ["object_store", "gloo"])
def test_a_replica_restarted_while_idle_is_logged_and_counted(transport, ray_session, tiny_llama):
    """A replica killed with no call in flight fails no call; the next refit must still see, log and count the
    restart (it once went unnoticed: train/actor_restarts stayed 0)."""
    from orchestration.refit import use_collective

    group = LearnerGroup(LearnerSpec(model_dir=tiny_llama, optim=OptimConfig(lr=1e-2, micro_batch_size=2),
                                     workers=1, num_cpus=0.5))
    engine = EngineSpec(model_dir=tiny_llama, max_batch_size=4)
    actor = engine_actor(GeneratorActor, num_cpus=0.5, num_gpus=0, max_restarts=2).remote(engine)
    logs: list[str] = []
    pool = EnginePool("generator", [actor], max_restarts=2, log=logs.append)
    pool.incarnations[0], _ = ray.get(actor.status.remote())
    pools = Pools(pool, EnginePool("judge", [], max_restarts=0), group)
    try:
        if transport == "gloo":
            use_collective(pools, "gloo", bucket_bytes=4096)
        first = pool.incarnations[0]
        ray.kill(actor, no_restart=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until Ray has brought it back
            try:
                if ray.get(actor.status.remote(), timeout=10)[0] != first:
                    break
            except (*RECOVERABLE, ray.exceptions.GetTimeoutError):
                time.sleep(0.2)
        refit(pools, version=1, bucket_bytes=4096)
        assert pool.total_restarts == 1
        assert any("generator replica 0 died (restarted by Ray while idle); restart 1/2" in line for line in logs)
        assert ray.get(actor.weight_version.remote()) == 1
    finally:
        group.shutdown()
        pool.shutdown()
