"""The collective refit transport, run over gloo on CPU (the GPU machine runs it over NCCL:
tests/test_refit_gpu.py): weights equal after a refit, versions recorded, a bad layout rejected before
anything is sent, a restarted replica restored from a peer and the group rebuilt; and the transport setting."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from actors.engines import EngineSpec
from actors.engines.protocol import GenerationRequest, SamplingParams
from actors.generator import GeneratorActor
from learner.group import LearnerGroup, LearnerSpec
from learner.types import LossConfig, OptimConfig, TrainSample
from orchestration.cluster import RECOVERABLE, EnginePool, Pools, ReplicaFailed, engine_actor
from orchestration.config import ConfigError, load_config, refit_transport
from orchestration.errors import RefitFailed
from orchestration.refit import refit, use_collective

BATCH = [TrainSample([2, 3], [4, 5], [6, 7]), TrainSample([8], [9, 10], [11])] * 2
REQUEST = [GenerationRequest([2, 3], SamplingParams(temperature=0, max_new_tokens=2))]


def _learner(model_dir: str, workers: int = 2) -> LearnerGroup:
    return LearnerGroup(LearnerSpec(model_dir=model_dir, optim=OptimConfig(lr=1e-2, micro_batch_size=2),
                                    workers=workers, num_cpus=0.5))


def _engines(model_dir: str, n: int, dtype: str = "float32", max_restarts: int = 0) -> list:
    spec = EngineSpec(model_dir=model_dir, max_batch_size=4, dtype=dtype)
    actors = [engine_actor(GeneratorActor, num_cpus=0.25, num_gpus=0, max_restarts=max_restarts).remote(spec)
              for _ in range(n)]
    ray.get([a.weight_version.remote() for a in actors])  # loaded, as start_pools waits for them
    return actors


def _digests(actors) -> list[dict]:
    return ray.get([a.weight_digest.remote() for a in actors])


def _versions(actors) -> list[int]:
    return [r.results[0].weight_version for r in ray.get([a.generate.remote(REQUEST) for a in actors])]


def _kill_and_wait(actor) -> None:
    """Kill a replica like a crash (Ray restarts it) and wait until the old process is gone."""
    ray.kill(actor, no_restart=False)
    while True:
        try:
            if ray.get(actor.weight_version.remote(), timeout=30) == -1:
                return  # restarted, waiting for weights
        except (*RECOVERABLE, ray.exceptions.GetTimeoutError):
            return
        time.sleep(0.05)


def _shutdown(group: LearnerGroup, *pools: EnginePool) -> None:
    group.shutdown()
    for pool in pools:
        pool.shutdown()


@pytest.mark.slow
def test_gloo_refit_gives_every_engine_the_learners_weights_and_version(ray_session, tiny_llama, tmp_path):
    """Generators in float32 and a judge in bfloat16: the source sends its own dtypes and each engine casts."""
    group = _learner(tiny_llama)
    gens, judges = EnginePool("generator", _engines(tiny_llama, 2), 0), EnginePool("judge", _engines(tiny_llama, 1, "bfloat16"), 0)
    pools = Pools(gens, judges, group)
    collective = use_collective(pools, "gloo", bucket_bytes=2048)  # small buckets: several per refit, both buffers
    assert collective.generation == 1 and len(collective.engines) == 3

    ray.get(group.train_step_async(BATCH, LossConfig(beta=0.5)))
    trained = group.weight_digest()
    assert _digests(gens)[0] != trained
    refit(pools, version=1, bucket_bytes=2048)
    assert _digests(gens) == [trained, trained]
    group.save(str(tmp_path / "ckpt"))  # the learner's weights, to check the judge's bfloat16 cast
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    judge_digest = _digests(judges)[0]
    assert judge_digest == {n: hashlib.sha1(saved[n].to(torch.bfloat16).view(-1).view(torch.uint8).numpy()).hexdigest()
                            for n in judge_digest}
    assert _versions(gens) + _versions(judges) == [1, 1, 1]
    assert gens.version == judges.version == 1 and gens.weight_refs == ()

    ray.get(group.train_step_async(BATCH, LossConfig(beta=0.5)))
    refit(pools, version=2, bucket_bytes=8192)  # another bucket size: a new layout in the same group
    assert collective.generation == 1 and collective.bucket_bytes == 8192
    assert _digests(gens) == [group.weight_digest()] * 2 and _versions(gens) == [2, 2]
    _shutdown(group, gens, judges)


@pytest.mark.slow
def test_a_layout_an_engine_rejects_stops_before_anything_is_sent(ray_session, tiny_llama, tmp_path):
    """A replica whose model does not match the learner's refuses the layout: the build fails naming it, and
    no engine's weights or version change."""
    from transformers import AutoModelForCausalLM

    other = tmp_path / "wider"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.config.intermediate_size = 96
    type(model)(model.config).save_pretrained(other)
    for f in Path(tiny_llama).glob("tokenizer*"):
        (other / f.name).write_bytes(f.read_bytes())
    group = _learner(tiny_llama, workers=1)
    gens = EnginePool("generator", _engines(tiny_llama, 1) + _engines(str(other), 1), 0)
    before = _digests(gens)
    with pytest.raises(RefitFailed, match=r"generator replica 1 rejected the refit layout: .*mlp.* has shape"):
        use_collective(Pools(gens, EnginePool("judge", [], 0), group), "gloo", bucket_bytes=2048)
    assert _digests(gens) == before and _versions(gens) == [0, 0]
    _shutdown(group, gens)


@pytest.mark.slow
def test_a_restarted_replica_is_restored_from_a_peer_and_the_group_rebuilt(ray_session, tiny_llama):
    group = _learner(tiny_llama, workers=1)
    logs: list[str] = []
    gens = EnginePool("generator", _engines(tiny_llama, 2, max_restarts=2), max_restarts=2, log=logs.append)
    pools = Pools(gens, EnginePool("judge", [], 0), group)
    collective = use_collective(pools, "gloo", bucket_bytes=2048)
    ray.get(group.train_step_async(BATCH[:2], LossConfig(beta=0.5)))
    refit(pools, version=1, bucket_bytes=2048)
    v1 = group.weight_digest()

    # Replica 1 dies mid-iteration: its call fails, the pool recovers it from replica 0 (not the learner).
    _kill_and_wait(gens.actors[1])
    with pytest.raises(RECOVERABLE) as died:
        ray.get(gens.call(1, "generate", REQUEST))
    ray.get(group.train_step_async(BATCH[:2], LossConfig(beta=0.5)))  # the learner moves past version 1
    gens.recover(1, died.value)
    assert any("generator replica 1 restored to version 1 from generator replica 0" in line for line in logs)
    assert _digests(gens) == [v1, v1] and _versions(gens) == [1, 1]
    assert ray.get(gens.actors[1].refit_group.remote()) == 0  # out of the group until the next refit

    refit(pools, version=2, bucket_bytes=2048)  # notices, rebuilds everywhere, sends
    assert collective.generation == 2
    assert _digests(gens) == [group.weight_digest()] * 2 and _versions(gens) == [2, 2]

    # Replica 0 dies while idle (nobody calls it): the next refit finds it out of the group and refits it too.
    _kill_and_wait(gens.actors[0])
    ray.get(group.train_step_async(BATCH[:2], LossConfig(beta=0.5)))
    refit(pools, version=3, bucket_bytes=2048)
    assert collective.generation == 3
    assert _digests(gens) == [group.weight_digest()] * 2 and _versions(gens) == [3, 3]
    _shutdown(group, gens)


@pytest.mark.slow
def test_a_restarted_replica_with_no_healthy_peer_stops_the_run(ray_session, tiny_llama):
    group = _learner(tiny_llama, workers=1)
    gens = EnginePool("generator", _engines(tiny_llama, 1, max_restarts=2), max_restarts=2, log=lambda _: None)
    pools = Pools(gens, EnginePool("judge", [], 0), group)
    use_collective(pools, "gloo", bucket_bytes=4096)

    _kill_and_wait(gens.actors[0])  # before any refit: its own weights are the current ones
    with pytest.raises(RECOVERABLE) as died:
        ray.get(gens.call(0, "generate", REQUEST))
    gens.recover(0, died.value)
    assert _versions(gens) == [0]

    refit(pools, version=1, bucket_bytes=4096)
    _kill_and_wait(gens.actors[0])
    with pytest.raises(RECOVERABLE) as died:
        ray.get(gens.call(0, "generate", REQUEST))
    with pytest.raises(ReplicaFailed, match=r"generator replica 0 restarted and no healthy replica serves weight "
                                            r"version 1.*resume from the last checkpoint"):
        gens.recover(0, died.value)
    _shutdown(group, gens)


@pytest.mark.parametrize("overrides, expected", [
    ([], "object_store"),  # the CPU default
    (["cluster.learner.num_gpus=1", "cluster.generators.num_gpus=1", "cluster.judges.num_gpus=1"], "nccl"),
    (["cluster.learner.num_gpus=1", "cluster.generators.num_gpus=1", "cluster.judges.num_gpus=0.5"], "cuda_ipc"),
    (["cluster.learner.num_gpus=0.5", "cluster.generators.num_gpus=0.5"], "object_store"),  # the judge on the CPU
    (["algorithm=spin", "cluster.learner.num_gpus=1", "cluster.generators.num_gpus=1"], "nccl"),  # no judge pool
    (["cluster.refit_transport=gloo"], "gloo"),
    (["cluster.refit_transport=object_store", "cluster.learner.num_gpus=1", "cluster.generators.num_gpus=1",
      "cluster.judges.num_gpus=1"], "object_store"),
])
def test_refit_transport_setting(overrides, expected):
    assert refit_transport(load_config(overrides)) == expected


def test_nccl_without_a_whole_gpu_per_rank_is_refused():
    with pytest.raises(ConfigError, match=r"cluster.refit_transport=nccl needs a whole GPU.*"
                                          r"cluster.learner.num_gpus=0, cluster.judges.num_gpus=0.5"):
        load_config(["cluster.refit_transport=nccl", "cluster.generators.num_gpus=1", "cluster.judges.num_gpus=0.5"])
    with pytest.raises(ConfigError, match="cluster.refit_transport='rdma' is not one of"):
        load_config(["cluster.refit_transport=rdma"])


def test_cuda_ipc_is_auto_on_shared_gpus_and_needs_every_pool_on_the_gpu():
    one_gpu = ["cluster.learner.num_gpus=0.4", "cluster.generators.num_gpus=0.3", "cluster.judges.num_gpus=0.3"]
    assert refit_transport(load_config(one_gpu)) == "cuda_ipc"  # auto, the one-GPU layout
    assert refit_transport(load_config([*one_gpu, "cluster.refit_transport=cuda_ipc"])) == "cuda_ipc"
    with pytest.raises(ConfigError, match=r"cuda_ipc copies between pools on one GPU, but cluster.judges.num_gpus=0"):
        load_config(["cluster.refit_transport=cuda_ipc", "cluster.learner.num_gpus=0.5",
                     "cluster.generators.num_gpus=0.5"])
    # a fixed judge is never refit: its pool may stay on the CPU
    assert refit_transport(load_config(["cluster.refit_transport=cuda_ipc", "cluster.learner.num_gpus=0.5",
                                        "cluster.generators.num_gpus=0.5", "judge.backend=verifier"])) == "cuda_ipc"


def test_a_cuda_ipc_export_is_refused_by_an_engine_on_the_cpu_and_by_a_learner_on_the_cpu():
    import torch

    from actors.ipc_receiver import IpcReceiver
    from learner.ipc_source import IpcSource

    with pytest.raises(ValueError, match="needs the learner on a GPU; it is on cpu"):
        IpcSource().export([("w", torch.zeros(2))], "bfloat16", torch.device("cpu"), live=True)
    with pytest.raises(ValueError, match="needs engines on a GPU; this one is on cpu"):
        IpcReceiver().map(None, torch.device("cpu"), {"device": "GPU-x", "token": "t", "layout": [], "handles": []})


def test_auto_falls_back_to_the_object_store_when_a_replica_is_on_another_gpu(monkeypatch):
    from orchestration import driver
    from orchestration.ipc_refit import IpcUnavailable

    def elsewhere(pools):
        raise IpcUnavailable("generator replica 0 cannot take CUDA IPC refits: on GPU-b, the learner on GPU-a")

    monkeypatch.setattr(driver, "use_cuda_ipc", elsewhere)
    one_gpu = ["cluster.learner.num_gpus=0.4", "cluster.generators.num_gpus=0.3", "cluster.judges.num_gpus=0.3"]
    logs = []
    assert driver.set_up_refits(load_config(one_gpu), None, logs.append) == "object_store"
    assert logs == ["[run] cuda_ipc refits are not possible here (generator replica 0 cannot take CUDA IPC refits: "
                    "on GPU-b, the learner on GPU-a): using the object store"]
    with pytest.raises(IpcUnavailable, match="on GPU-b"):  # asked for by name: the run stops
        driver.set_up_refits(load_config([*one_gpu, "cluster.refit_transport=cuda_ipc"]), None, logs.append)
