"""The CUDA IPC refit on one GPU (run on the GPU machine; skipped without CUDA): learner rank 0 and engine
replicas on fractions of the same GPU, as the one-GPU layout places them. A float32 learner's live weights
(one storage per parameter) are copied by the engines straight into bfloat16 and the new version served;
the staged path (megatron, fsdp2) does the same through the learner's buffer; a replica Ray restarts after
a live refit is restored from its peer, the learner having trained on."""

from __future__ import annotations

import pytest
import ray
import torch

from actors.engines import EngineSpec
from actors.generator import GeneratorActor
from learner.group import LearnerGroup, LearnerSpec
from learner.types import LossConfig, OptimConfig
from orchestration.cluster import EnginePool, Pools, engine_actor
from orchestration.ipc_refit import use_cuda_ipc
from orchestration.refit import refit
from test_refit_gpu import BATCH, _engine_state, _learner_digest_in_bf16, kill_and_wait_for_restart
from test_refit_gpu import model_dir  # noqa: F401 (a fixture this module's tests use)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def pools(ray_session, model_dir):  # noqa: F811
    group = LearnerGroup(LearnerSpec(model_dir=model_dir, optim=OptimConfig(lr=1e-2, micro_batch_size=2),
                                     workers=1, num_cpus=1, num_gpus=0.4, dtype="float32"))
    spec = EngineSpec(model_dir=model_dir, device="cuda", dtype="bfloat16", max_batch_size=4, max_seq_len=128)
    engines = [engine_actor(GeneratorActor, num_cpus=1, num_gpus=0.3, max_restarts=1).remote(spec) for _ in range(2)]
    ray.get([engine.weight_version.remote() for engine in engines])
    pools = Pools(EnginePool("generator", engines, max_restarts=1, log=lambda _: None),
                  EnginePool("judge", [], max_restarts=0), group)
    yield pools
    pools.shutdown()


@pytest.mark.parametrize("live", [True, False], ids=["live", "staged"])
def test_cuda_ipc_refit_gives_the_engine_the_learners_weights_and_version(pools, tmp_path, live):
    if not live:  # what a backend whose weights are gathered copies does (megatron, fsdp2)
        # a lambda travels by value (a function of this module would be looked up by name in the worker)
        ray.get(pools.learner.workers[0].__ray_call__.remote(lambda w: setattr(w.backend, "live_weights", False)))
    before, version = _engine_state(pools)
    use_cuda_ipc(pools)  # maps the learner's memory, loads nothing
    assert pools.collective.export["live"] is live
    assert _engine_state(pools) == (before, 0)
    for v in (1, 2):
        ray.get(pools.learner.train_step_async(BATCH, LossConfig(beta=0.5)))
        refit(pools, version=v)
        digest, version = _engine_state(pools)
        expected = _learner_digest_in_bf16(pools.learner, tmp_path / f"v{v}")
        assert digest == {name: expected[name] for name in digest}
        assert version == v and digest != before
        before = digest


def test_a_replica_restarted_after_a_live_refit_is_restored_from_its_peer(pools, tmp_path):
    use_cuda_ipc(pools)
    ray.get(pools.learner.train_step_async(BATCH, LossConfig(beta=0.5)))
    refit(pools, version=1)
    expected = _learner_digest_in_bf16(pools.learner, tmp_path / "v1")
    ray.get(pools.learner.train_step_async(BATCH, LossConfig(beta=0.5)))  # the learner moves past version 1
    kill_and_wait_for_restart(pools.generators.actors[0])
    pools.generators.recover(0, RuntimeError("killed by the test"))
    digest, version = _engine_state(pools)
    assert version == 1 and digest == {name: expected[name] for name in digest}  # version 1, not the learner's now
