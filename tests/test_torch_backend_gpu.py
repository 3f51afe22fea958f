"""The torch learner's GPU path (run on the GPU machine; skipped without CUDA): bf16 mixed precision agrees with
float32, attention runs on the flash kernel, a step queues its work without waiting on the device, and the
fused log-prob and RMSNorm kernels match the plain computations. Ours are asked for by name (kernels="torch")
until the last test: Liger's patch, once applied, replaces transformers' Llama modules for the whole process."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaConfig, LlamaForCausalLM

from learner import losses
from learner.backends.torch_backend import TorchBackend
from learner.types import LossConfig, OptimConfig, TrainSample

pytestmark = pytest.mark.gpu
VOCAB = 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small random Llama with the 1B model's head size (64) and grouped KV heads, float32 checkpoint."""
    path = tmp_path_factory.mktemp("small")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def pairs(n: int, seed: int) -> list[TrainSample]:
    """Pairs of different lengths (so micro-batches are padded)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(1, VOCAB, (k,), generator=g).tolist()  # noqa: E731
    return [TrainSample(rand(20 + 7 * (i % 3)), rand(30 + 11 * (i % 4)), rand(25 + 5 * (i % 5))) for i in range(n)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_bf16_logprobs_agree_with_float32(model_dir):
    samples = pairs(8, seed=1)
    prompts, responses = [s.prompt_ids for s in samples], [s.chosen_ids for s in samples]
    bf16 = TorchBackend(model_dir, OptimConfig(), device="cuda", dtype="bfloat16", kernels="torch")
    fp32 = TorchBackend(model_dir, OptimConfig(), device="cuda", dtype="float32", kernels="torch")
    got = torch.tensor([x for row in bf16.logprobs(prompts, responses) for x in row])
    want = torch.tensor([x for row in fp32.logprobs(prompts, responses) for x in row])
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert rel(got, want) < 1e-2
    reference = torch.tensor([x for row in bf16.logprobs(prompts, responses, reference=True) for x in row])
    # The reference is a copy of the same bf16 model until the policy steps. Seen on an H200: equal to rounding
    # but not bit for bit (the two copies' kernels need not reduce in the same order).
    assert rel(reference, got) < 1e-4


def test_bf16_dpo_step_agrees_with_float32(model_dir):
    batch, cfg = pairs(8, seed=2), LossConfig(beta=0.5, sft_loss_weight=0.3)
    optim = OptimConfig(lr=1e-3, micro_batch_size=4)
    fp32 = TorchBackend(model_dir, optim, device="cuda", dtype="float32", kernels="torch")
    bf16 = TorchBackend(model_dir, optim, device="cuda", dtype="bfloat16", kernels="torch")
    m32, m16 = fp32.train_step(batch, cfg), bf16.train_step(batch, cfg)
    assert m16["preference_loss"] == pytest.approx(math.log(2), abs=1e-6) and m16["rewards_chosen_mean"] == 0
    assert m16["loss"] == pytest.approx(m32["loss"], rel=1e-2)
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=3e-2)
    g32 = torch.cat([fp32.optimizer.state[p]["exp_avg"].flatten() for p in fp32.module.parameters()])
    g16 = torch.cat([bf16.optimizer.state[m]["exp_avg"].flatten() for m in bf16.master.params])
    assert rel(g16, g32) < 3e-2
    m32, m16 = fp32.train_step(batch, cfg), bf16.train_step(batch, cfg)
    assert m16["loss"] == pytest.approx(m32["loss"], rel=2e-2)
    margin = lambda m: m["rewards_chosen_mean"] - m["rewards_rejected_mean"]  # noqa: E731
    assert margin(m16) == pytest.approx(margin(m32), rel=0.1)
    for p, m in zip(bf16.module.parameters(), bf16.master.params):
        assert torch.equal(p, m.detach().to(torch.bfloat16))


def test_attention_runs_on_the_flash_kernel(model_dir):
    """No padding mask reaches SDPA (the batch is right-padded), so forward and backward run on flash."""
    backend = TorchBackend(model_dir, OptimConfig(lr=1e-4, micro_batch_size=4), device="cuda", dtype="bfloat16",
                           kernels="torch")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if SDPA needs another kernel
        metrics = backend.train_step(pairs(4, seed=3), LossConfig())
    assert math.isfinite(metrics["loss"])


def test_a_step_queues_its_work_without_waiting_on_the_device(model_dir):
    backend = TorchBackend(model_dir, OptimConfig(lr=1e-4, micro_batch_size=2), device="cuda", dtype="bfloat16",
                           kernels="torch")
    batch = pairs(4, seed=4)
    cfg = LossConfig(preference_loss="rpo_sq", beta=0.1)
    batch = [TrainSample(s.prompt_ids, s.chosen_ids, s.rejected_ids, 4.0, 1.0) for s in batch]  # scores: rpo
    backend.train_step(batch, cfg)  # warm-up: optimizer state, kernels, pinned buffers
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums, grad_norm, _, _ = backend._step(batch, cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sums.is_cuda and grad_norm.is_cuda
    assert torch.isfinite(sums).all() and sums[0].item() == len(batch)


def test_token_logprobs_on_a_llama3_vocabulary(monkeypatch):
    """bf16 logits over 128256 tokens in several chunks: float32 values, and the float32 path's gradient."""
    monkeypatch.setattr(losses, "_LOGPROB_CHUNK_ELEMENTS", 3 * 128256)
    g = torch.Generator(device="cuda").manual_seed(5)
    logits = (4 * torch.randn(10, 128256, device="cuda", generator=g)).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 128256, (10,), device="cuda", generator=g)
    weights = torch.randn(10, device="cuda", generator=g)
    out = losses.token_logprobs(logits, labels)
    (out * weights).sum().backward()
    ref_logits = logits.detach().float().requires_grad_(True)
    ref = torch.log_softmax(ref_logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    (ref * weights).sum().backward()
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert logits.grad.dtype == torch.bfloat16
    assert rel(logits.grad, ref_logits.grad) < 4e-3  # the float32 gradient rounded to bf16 once


def test_rms_norms_run_fused_and_match_transformers(model_dir):
    backend = TorchBackend(model_dir, OptimConfig(), device="cuda", dtype="bfloat16", kernels="torch")
    norms = [m for m in backend.module.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all("forward" in vars(m) for m in norms)
    x = torch.randn(3, 17, 256, device="cuda", dtype=torch.bfloat16)
    for norm in norms:
        assert rel(norm(x), type(norm).forward(norm, x)) < 1e-2


def test_liger_kernels_agree_with_ours_and_keep_policy_and_reference_alike(model_dir):
    """learner.kernels=liger: Liger Kernel's RoPE, RMSNorm and SwiGLU in policy and reference both, so the first
    step's DPO loss is ln 2 (no margin where policy == reference), and two steps land where ours do; auto (the
    default) takes it on a GPU."""
    pytest.importorskip("liger_kernel.transformers")
    batches = [pairs(8, seed=5), pairs(8, seed=6)]
    runs = {}
    for kernels in ("torch", "liger"):
        backend = TorchBackend(model_dir, OptimConfig(lr=1e-4, micro_batch_size=4), device="cuda", dtype="bfloat16",
                               kernels=kernels)
        losses_ = [backend.train_step(b, LossConfig(beta=0.1))["loss"] for b in batches]
        runs[kernels] = (losses_, torch.cat([p.detach().float().flatten() for p in backend.module.parameters()]))
    assert abs(runs["liger"][0][0] - math.log(2)) < 1e-3
    assert abs(runs["liger"][0][1] - runs["torch"][0][1]) < 2e-2
    assert rel(runs["liger"][1], runs["torch"][1]) < 1e-3
    assert TorchBackend(model_dir, OptimConfig(), device="cuda", dtype="bfloat16").kernels == "liger"  # auto
