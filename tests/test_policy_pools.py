"""Only pools that follow the policy are refit: a judge with fixed weights keeps them, stays out of the
collective refit group, and its GPUs do not decide the refit transport."""

import pytest
import ray

from actors.engines import EngineSpec
from actors.engines.protocol import SamplingParams
from actors.generator import GeneratorActor
from actors.judge import JudgeActor
from actors.judges import JUDGE_BACKENDS
from actors.judges.protocol import FIXED, JudgeItem, JudgeSpec
from learner.group import LearnerGroup, LearnerSpec
from learner.types import LossConfig, OptimConfig, TrainSample
from orchestration.cluster import EnginePool, Pools, engine_actor
from orchestration.config import load_config, refit_transport
from orchestration.refit import refit, use_collective

BATCH = [TrainSample([2, 3], [4, 5], [6, 7]), TrainSample([8], [9, 10], [11])] * 2


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["object_store", "gloo"])
def test_a_fixed_judge_is_never_refit(transport, ray_session, tiny_llama):
    group = LearnerGroup(LearnerSpec(model_dir=tiny_llama, optim=OptimConfig(lr=1e-2, micro_batch_size=2),
                                     workers=1, num_cpus=0.5))
    engine = EngineSpec(model_dir=tiny_llama, max_batch_size=4)
    gen = engine_actor(GeneratorActor, num_cpus=0.25, num_gpus=0).remote(engine)
    fixed = JudgeSpec("Rate {prompt} {response}", SamplingParams(temperature=0, max_new_tokens=2),
                      chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}", follows_policy=False)
    judge = engine_actor(JudgeActor, num_cpus=0.25, num_gpus=0).remote(engine, fixed)
    pools = Pools(EnginePool("generator", [gen], 0), EnginePool("judge", [judge], 0, follows_policy=False), group)
    try:
        judge_weights = ray.get(judge.weight_digest.remote())
        if transport == "gloo":
            assert len(use_collective(pools, "gloo", bucket_bytes=4096).engines) == 1  # the generator only
        ray.get(group.train_step_async(BATCH, LossConfig(beta=0.5)))
        refit(pools, version=1, bucket_bytes=4096)
        assert ray.get(gen.weight_digest.remote()) == group.weight_digest() != judge_weights
        assert ray.get(judge.weight_digest.remote()) == judge_weights
        assert pools.judges.version == 0 and pools.generators.version == 1
        batch = ray.get(judge.judge.remote([JudgeItem("t2", "t3", (1,))]))
        assert batch.judgements[0].weight_version == FIXED
    finally:
        group.shutdown()
        pools.shutdown()


def test_a_fixed_judges_gpus_do_not_decide_the_refit_transport(tiny_llama):
    gpus = ["cluster.generators.num_gpus=1", "cluster.learner.num_gpus=1", "cluster.judges.num_gpus=0.5"]
    assert refit_transport(load_config(gpus)) == "cuda_ipc"  # the policy judge shares a GPU: no NCCL
    assert refit_transport(load_config([*gpus, "judge.backend=model", f"judge.model.path={tiny_llama}"])) == "nccl"
    assert refit_transport(load_config([*gpus, "judge.backend=triton"])) == "nccl"
    assert not JUDGE_BACKENDS["model"].follows_policy and not JUDGE_BACKENDS["triton"].follows_policy
