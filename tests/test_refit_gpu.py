"""The NCCL refit on two GPUs (run on the GPU machine; skipped without two CUDA devices): learner rank 0 on
one GPU, an engine replica on the other. A float32 learner sends bfloat16 (the engine's dtype), many small
buckets exercise the two-buffer pipeline, the engine reports the new version, and the group survives a
replica restart (rebuilt under a new generation)."""

from __future__ import annotations

import hashlib
import time

import pytest
import ray
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from actors.engines import EngineSpec
from actors.engines.protocol import GenerationRequest, SamplingParams
from actors.generator import GeneratorActor
from learner.group import LearnerGroup, LearnerSpec
from learner.types import LossConfig, OptimConfig, TrainSample
from orchestration.cluster import RECOVERABLE, EnginePool, Pools, engine_actor
from orchestration.refit import refit, use_collective

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]

BUCKET_BYTES = 1 << 20  # ~25 buckets of the 24 MB sent: both buffers alternate many times
BATCH = [TrainSample([2, 3, 4], [5, 6], [7, 8]), TrainSample([9], [10, 11], [12])]
REQUEST = [GenerationRequest([2, 3, 4], SamplingParams(temperature=0, max_new_tokens=4))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("refit_gpu")
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(256)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(path)
    return str(path)


@pytest.fixture
def pools(ray_session, model_dir):
    group = LearnerGroup(LearnerSpec(model_dir=model_dir, optim=OptimConfig(lr=1e-2, micro_batch_size=2),
                                     workers=1, num_cpus=1, num_gpus=1, dtype="float32"))
    spec = EngineSpec(model_dir=model_dir, device="cuda", dtype="bfloat16", max_batch_size=4, max_seq_len=128)
    engine = engine_actor(GeneratorActor, num_cpus=1, num_gpus=1, max_restarts=1).remote(spec)
    ray.get(engine.weight_version.remote())  # loaded, as start_pools waits for it
    pools = Pools(EnginePool("generator", [engine], max_restarts=1, log=lambda _: None),
                  EnginePool("judge", [], max_restarts=0), group)
    yield pools
    pools.shutdown()


def _learner_digest_in_bf16(group: LearnerGroup, path) -> dict[str, str]:
    group.save(str(path))
    saved = load_file(str(path / "model.safetensors"))
    return {name: hashlib.sha1(t.to(torch.bfloat16).view(-1).view(torch.uint8).numpy()).hexdigest()
            for name, t in saved.items()}


def _engine_state(pools: Pools) -> tuple[dict, int]:
    actor = pools.generators.actors[0]
    digest = ray.get(actor.weight_digest.remote())
    return digest, ray.get(actor.generate.remote(REQUEST)).results[0].weight_version


def kill_and_wait_for_restart(actor) -> None:
    """Kill an engine replica and wait until Ray has it back, waiting for weights (version -1)."""
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if ray.get(actor.weight_version.remote(), timeout=30) == -1:
                return
        except (*RECOVERABLE, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError("the replica did not come back within 120 s")


def test_nccl_refit_gives_the_engine_the_learners_weights_and_version(pools, tmp_path):
    collective = use_collective(pools, "nccl", BUCKET_BYTES)
    assert collective.generation == 1
    before, version = _engine_state(pools)
    assert version == 0
    for v in (1, 2):
        ray.get(pools.learner.train_step_async(BATCH, LossConfig(beta=0.5)))
        refit(pools, version=v, bucket_bytes=BUCKET_BYTES)
        digest, version = _engine_state(pools)
        expected = _learner_digest_in_bf16(pools.learner, tmp_path / f"v{v}")
        assert digest == {name: expected[name] for name in digest}  # float32 learner, bfloat16 on the wire
        assert version == v and digest != before
        before = digest
    assert collective.generation == 1  # one group for every refit


def test_nccl_group_is_rebuilt_after_a_replica_restart(pools, tmp_path):
    collective = use_collective(pools, "nccl", BUCKET_BYTES)
    refit(pools, version=1, bucket_bytes=BUCKET_BYTES)
    kill_and_wait_for_restart(pools.generators.actors[0])  # an idle replica dies; learner rank 0 outlives it
    ray.get(pools.learner.train_step_async(BATCH, LossConfig(beta=0.5)))
    refit(pools, version=2, bucket_bytes=BUCKET_BYTES)
    assert collective.generation == 2
    digest, version = _engine_state(pools)
    expected = _learner_digest_in_bf16(pools.learner, tmp_path / "v2")
    assert digest == {name: expected[name] for name in digest} and version == 2
