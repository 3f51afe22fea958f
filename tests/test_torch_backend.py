"""The torch learner backend: gradient accumulation, metrics, save/export."""

import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learner.backends.torch_backend import TorchBackend
from refit_wire import pack_buckets
from learner.types import LossConfig, OptimConfig, TrainSample


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(1, 64, (k,), generator=g).tolist()  # noqa: E731
    return [TrainSample(rand(3 + i % 3), rand(2 + i % 4), rand(1 + i % 5), 4.0, 1.0) for i in range(n)]


def test_gradient_accumulation_equals_one_big_batch(model_dir):
    optim = OptimConfig(lr=1e-2, micro_batch_size=8)
    big = TorchBackend(model_dir, optim)
    small = TorchBackend(model_dir, dataclasses.replace(optim, micro_batch_size=2))
    batch = pairs(8)
    m_big = big.train_step(batch, LossConfig(beta=0.5, sft_loss_weight=0.3))
    m_small = small.train_step(batch, LossConfig(beta=0.5, sft_loss_weight=0.3))
    assert m_big["loss"] == pytest.approx(m_small["loss"], rel=1e-5)
    assert m_big["grad_norm"] == pytest.approx(m_small["grad_norm"], rel=1e-4)
    # Adam's first moment after one step is (1 - beta1) * gradient: compare the gradients through it
    # (the weights themselves move by ~lr * sign(grad), which amplifies rounding near zero).
    for p_big, p_small in zip(big.module.parameters(), small.module.parameters()):
        g_big = big.optimizer.state[p_big]["exp_avg"]
        g_small = small.optimizer.state[p_small]["exp_avg"]
        assert torch.allclose(g_big, g_small, atol=1e-7, rtol=1e-4)


def test_first_step_metrics_at_the_reference_and_learning(model_dir):
    backend = TorchBackend(model_dir, OptimConfig(lr=5e-3, micro_batch_size=4))
    batch = pairs(4, seed=1)
    first = backend.train_step(batch, LossConfig(beta=0.1))
    assert first["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards_chosen_mean"] == 0 and first["rewards_all_std"] == 0
    for _ in range(10):
        last = backend.train_step(batch, LossConfig(beta=0.1))
    assert last["preference_loss"] < first["preference_loss"] and last["acc"] == 1.0
    assert last["rewards_chosen_mean"] > last["rewards_rejected_mean"]


def test_update_reference_resets_the_log_ratio(model_dir):
    backend = TorchBackend(model_dir, OptimConfig(lr=5e-3, micro_batch_size=4))
    batch = pairs(4, seed=2)
    for _ in range(3):
        backend.train_step(batch, LossConfig(beta=0.1))
    backend.update_reference()
    policy = backend.logprobs([s.prompt_ids for s in batch], [s.chosen_ids for s in batch])
    reference = backend.logprobs([s.prompt_ids for s in batch], [s.chosen_ids for s in batch], reference=True)
    assert policy == reference


def test_sft_batch_and_mixed_batch_rejected(model_dir):
    backend = TorchBackend(model_dir, OptimConfig(lr=1e-3, micro_batch_size=2))
    sft = [TrainSample([1, 2], [3, 4]), TrainSample([5], [6, 7, 8])]
    metrics = backend.train_step(sft, LossConfig(preference_loss_weight=0.0, sft_loss_weight=1.0))
    assert metrics["loss"] == pytest.approx(metrics["sft_loss"]) and "acc" not in metrics
    with pytest.raises(ValueError, match="all preference pairs or all SFT"):
        backend.train_step([sft[0], pairs(1)[0]], LossConfig())


def test_export_skips_tied_head_and_packs_every_weight(model_dir):
    backend = TorchBackend(model_dir, OptimConfig())
    named = dict(backend.named_weights())
    assert "lm_head.weight" not in named and "model.embed_tokens.weight" in named
    buckets = pack_buckets(named.items(), bucket_bytes=4096)
    assert len(buckets) > 1
    names = [n for b in buckets for n in b["names"]]
    assert names == list(named)
    for b in buckets:
        for name, dtype, shape, offset in zip(b["names"], b["dtypes"], b["shapes"], b["offsets"]):
            n = math.prod(shape) * 4
            got = torch.frombuffer(bytearray(b["data"][offset : offset + n].tobytes()), dtype=torch.float32)
            assert offset % 64 == 0 and dtype == "float32"
            assert torch.equal(got.reshape(shape), named[name])


def test_reset_optimizer_clears_moments_and_restarts_the_schedule(model_dir):
    backend = TorchBackend(model_dir, OptimConfig(lr=1e-2, warmup_steps=4, micro_batch_size=4))
    batch = pairs(4, seed=3)
    lrs = [backend.train_step(batch, LossConfig())["lr"] for _ in range(3)]
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3])
    assert backend.optimizer.state  # Adam moments exist
    backend.reset_optimizer()
    assert not backend.optimizer.state and backend.step == 0
    assert backend.train_step(batch, LossConfig())["lr"] == pytest.approx(2.5e-3)


def test_liger_kernels_are_refused_where_they_cannot_run_and_auto_takes_ours_there(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestration import load_config
    from orchestration.errors import ConfigError

    path = tmp_path / "m"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    with pytest.raises(ValueError, match="learner.kernels=liger runs Liger Kernel's Triton kernels, which need a GPU; "
                                         "this learner is on cpu"):
        TorchBackend(str(path), OptimConfig(), device="cpu", kernels="liger")
    assert TorchBackend(str(path), OptimConfig(), device="cpu").kernels == "torch"  # auto, the default: no GPU
    with pytest.raises(ValueError, match="learner.kernels='fused' is not one of: auto, torch, liger"):
        TorchBackend(str(path), OptimConfig(), device="cpu", kernels="fused")
    with pytest.raises(ConfigError, match="learner.kernels=liger is an option of learner.backend=torch"):
        load_config(["learner.backend=megatron", "learner.kernels=liger"])
