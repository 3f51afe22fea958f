"""Weight refit through the object store: the learner's weights land in every engine, with the version."""

import pytest
import ray
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models

from actors.engine_host import EngineSpec
from actors.engines.protocol import GenerationRequest, SamplingParams
from actors.generator import GeneratorActor
from learner.group import LearnerGroup, LearnerSpec
from learner.types import LossConfig, OptimConfig, TrainSample
from orchestration.cluster import EnginePool, Pools, engine_actor, refit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("refit_model")
    vocab = {f"t{i}": i for i in range(64)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  eos_token="t1", pad_token="t0")
    tok.save_pretrained(path)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, eos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def test_refit_copies_trained_weights_into_every_engine(ray_session, tiny_model):
    group = LearnerGroup(LearnerSpec(model_dir=tiny_model, optim=OptimConfig(lr=1e-2, micro_batch_size=2), workers=2))
    engine = EngineSpec(model_dir=tiny_model, max_batch_size=4)
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
