"""The torch backend's precision modes on the CPU: bf16 compute with float32 master weights (learner.dtype=
bfloat16), the response-only log-prob path, checkpoints of the masters, and data parallel all-reduce in float32."""

import dataclasses
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from learner.backends.torch_backend import TorchBackend, _ResponseLogprobs, _token_logprobs
from learner.objective import collate as _collate
from learner.types import LossConfig, OptimConfig, TrainSample

VOCAB = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(1, VOCAB, (k,), generator=g).tolist()  # noqa: E731
    return [TrainSample(rand(3 + i % 3), rand(2 + i % 4), rand(1 + i % 5), 4.0, 1.0) for i in range(n)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_response_logprobs_match_the_padded_full_logits_computation(model_dir):
    """Head on the response rows only, no attention mask on a right-padded batch: the same log-probs as the full
    logits with the padding mask (sequences of different lengths, so some are padded)."""
    backend = TorchBackend(model_dir, OptimConfig())
    samples = pairs(6, seed=5)
    prompts, responses = [s.prompt_ids for s in samples], [s.rejected_ids for s in samples]
    batch = _collate(prompts, responses, "cpu")
    got = _token_logprobs(backend.policy, batch)
    generic = _ResponseLogprobs(backend.module)
    generic.split_head = False  # the path for heads that are not a plain matmul
    assert torch.allclose(_token_logprobs(generic, batch), got, atol=1e-5)
    with torch.no_grad():
        seqs = [p + r for p, r in zip(prompts, responses)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        logp = torch.log_softmax(backend.module(input_ids=ids, attention_mask=attention).logits.double(), -1)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            expected = [logp[b, len(p) - 1 + t, tok].item() for t, tok in enumerate(r)]
            row = got[b, len(p) - 1 : len(p) - 1 + len(r)]
            assert row.tolist() == pytest.approx(expected, abs=1e-5)
    assert (got * (1 - batch["mask"]) == 0).all()


def test_bf16_model_computes_with_rounded_masters_and_the_masters_move(model_dir):
    """At a DPO learning rate a bf16 AdamW step is below bf16 resolution; the float32 masters take it."""
    backend = TorchBackend(model_dir, OptimConfig(lr=5e-7, micro_batch_size=4), dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in backend.module.parameters())
    assert all(p.dtype == torch.bfloat16 for p in backend.reference.parameters())
    before = [m.detach().clone() for m in backend.master.params]
    first = backend.train_step(pairs(4, seed=1), LossConfig(beta=0.1))
    # The reference is the same bf16 model: the first step's log-ratios are exactly zero.
    assert first["preference_loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards_chosen_mean"] == 0
    moved = sum((m != b).sum().item() for m, b in zip(backend.master.params, before))
    assert moved / sum(b.numel() for b in before) > 0.9
    for p, m in zip(backend.module.parameters(), backend.master.params):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        assert torch.equal(p, m.detach().to(torch.bfloat16))
        assert (p.data_ptr() - backend.master.flat_model.data_ptr()) % 512 == 0  # matmul kernels see aligned weights


def test_bf16_step_agrees_with_float32(model_dir):
    batch, cfg = pairs(8, seed=2), LossConfig(beta=0.5, sft_loss_weight=0.3)
    optim = OptimConfig(lr=1e-3, micro_batch_size=4)
    full, mixed = TorchBackend(model_dir, optim), TorchBackend(model_dir, optim, dtype="bfloat16")
    m_full, m_mixed = full.train_step(batch, cfg), mixed.train_step(batch, cfg)
    assert m_mixed["loss"] == pytest.approx(m_full["loss"], rel=1e-2)
    assert m_mixed["grad_norm"] == pytest.approx(m_full["grad_norm"], rel=3e-2)
    g_full = torch.cat([full.optimizer.state[p]["exp_avg"].flatten() for p in full.module.parameters()])
    g_mixed = torch.cat([mixed.optimizer.state[m]["exp_avg"].flatten() for m in mixed.master.params])
    assert rel(g_mixed, g_full) < 3e-2
    m2_full, m2_mixed = full.train_step(batch, cfg), mixed.train_step(batch, cfg)
    assert m2_mixed["loss"] == pytest.approx(m2_full["loss"], rel=2e-2)
    assert m2_mixed["rewards_chosen_mean"] - m2_mixed["rewards_rejected_mean"] == pytest.approx(
        m2_full["rewards_chosen_mean"] - m2_full["rewards_rejected_mean"], rel=0.1)


def test_bf16_micro_batches_accumulate_in_float32(model_dir):
    """Four micro-batches give the gradient of one big batch: the hooks add every micro-batch, in float32."""
    optim = OptimConfig(lr=1e-3, micro_batch_size=8)
    big = TorchBackend(model_dir, optim, dtype="bfloat16")
    small = TorchBackend(model_dir, dataclasses.replace(optim, micro_batch_size=2), dtype="bfloat16")
    batch = pairs(8, seed=3)
    m_big, m_small = big.train_step(batch, LossConfig()), small.train_step(batch, LossConfig())
    assert m_big["grad_norm"] == pytest.approx(m_small["grad_norm"], rel=1e-2)
    g_big = torch.cat([big.optimizer.state[m]["exp_avg"].flatten() for m in big.master.params])
    g_small = torch.cat([small.optimizer.state[m]["exp_avg"].flatten() for m in small.master.params])
    assert rel(g_small, g_big) < 1e-2
    assert all(p.grad is None for p in small.module.parameters())  # bf16 gradients freed into the masters


def test_bf16_checkpoint_holds_the_float32_masters_and_resumes_exactly(model_dir, tmp_path):
    optim, cfg = OptimConfig(lr=1e-3, micro_batch_size=4), LossConfig(beta=0.1)
    backend = TorchBackend(model_dir, optim, dtype="bfloat16")
    backend.train_step(pairs(4, seed=4), cfg)
    backend.save(str(tmp_path / "ckpt"))
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert "lm_head.weight" not in saved  # tied: written once
    assert all(t.dtype == torch.float32 for t in saved.values())
    masters = {name: m for (name, _), m in zip(backend.module.named_parameters(), backend.master.params)}
    for name, tensor in saved.items():
        assert torch.equal(tensor, masters[name].detach())
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == "float32"

    # As a mid-iteration resume does: the reference is the iteration-start checkpoint (a float32 one, read as
    # bf16 here, which must round as the original's copy of its masters did).
    resumed = TorchBackend(str(tmp_path / "ckpt"), optim, dtype="bfloat16", reference_dir=model_dir)
    resumed.load_training_state(str(tmp_path / "ckpt"))
    batch = pairs(4, seed=5)
    assert resumed.train_step(batch, cfg) == backend.train_step(batch, cfg)
    for a, b in zip(resumed.master.params, backend.master.params):
        assert torch.equal(a, b)


def test_float16_is_refused_with_the_reason(model_dir):
    with pytest.raises(ValueError, match="float16 would need loss scaling"):
        TorchBackend(model_dir, OptimConfig(), dtype="float16")


def _rank_step(rank, world, init_file, model_dir, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        backend = TorchBackend(model_dir, OptimConfig(lr=1e-3, micro_batch_size=2), dtype="bfloat16", rank=rank,
                               world_size=world)
        batch = pairs(8, seed=6)
        share = batch[rank * 4 : (rank + 1) * 4]
        metrics = backend.train_step(share, LossConfig(beta=0.1))
        torch.save({"metrics": metrics, "masters": [m.detach() for m in backend.master.params]},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bf16_data_parallel_all_reduces_float32_gradients(model_dir, tmp_path):
    """Two gloo ranks on half the batch each end the step with the weights of one rank on the whole batch."""
    mp.spawn(_rank_step, args=(2, str(tmp_path / "pg"), model_dir, str(tmp_path)), nprocs=2)
    single = TorchBackend(model_dir, OptimConfig(lr=1e-3, micro_batch_size=2), dtype="bfloat16")
    expected = single.train_step(pairs(8, seed=6), LossConfig(beta=0.1))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["metrics"]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert got["metrics"]["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
        for a, b in zip(got["masters"], single.master.params):
            assert torch.allclose(a, b.detach(), rtol=1e-6, atol=1e-9)
