"""The megatron backend on GPUs in bf16 against the torch backend (the CPU parity tests' twins).

Needs 2 CUDA devices (TP=2 and PP=2 use both) and megatron-core. A random-weight Llama built from a
config, saved in bf16 so both backends start from the same values. megatron keeps fp32 main weights and
gradients (its distributed optimizer), the torch backend trains the bf16 weights directly, so agreement is
within bf16 rounding, not exact.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from learner.backends import megatron
from learner.backends.torch_backend import TorchBackend
from learner.types import LossConfig, OptimConfig
from megatron_harness import megatron_rank, pairs, run_ranks, scenario

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not megatron.available(), reason=f"needs megatron-core: {megatron.INSTALL_HINT}"),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

CONFIG = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                     tie_word_embeddings=True)
OPTIM = OptimConfig(lr=1e-4, micro_batch_size=2, max_grad_norm=1.0)
LOSS = LossConfig(beta=0.5, sft_loss_weight=0.3)
BATCHES = (pairs(8, seed=1, vocab=4096, length=16), pairs(8, seed=2, vocab=4096, length=16))  # 32-112 tokens
LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 2), "pp2": (1, 2, 2)}  # (tensor, pipeline, world)
LOGPROB_TOL = 0.05  # per token, absolute: bf16 logits of a model this size


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(CONFIG).to(torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def torch_run(model_dir, tmp_path_factory):
    backend = TorchBackend(model_dir, OPTIM, device="cuda:0", dtype="bfloat16")
    ckpt = str(tmp_path_factory.mktemp("torch_gpu") / "ckpt")
    out = scenario(backend, lambda b: b, ckpt, lambda be: [be.rng_state()], BATCHES, LOSS)
    del backend
    torch.cuda.empty_cache()
    return out


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, model_dir, tmp_path_factory, torch_run):
    tp, pp, world = LAYOUTS[request.param]
    ckpt = str(tmp_path_factory.mktemp(f"gpu_{request.param}") / "ckpt")
    # megatron_rank's own gpu and dtype go positionally; run_ranks' gpu=True gives each rank its device.
    return ckpt, run_ranks(megatron_rank, world, model_dir, ckpt, OPTIM, LOSS, BATCHES, tp, pp, True, "bfloat16",
                           gpu=True)


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(r) for r in a] == [len(r) for r in b]
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_bf16_logprobs_match_torch(layout, torch_run):
    _, results = layout
    ours = results[0]
    assert max_diff(ours["logprobs"], torch_run["logprobs"]) < LOGPROB_TOL
    assert max_diff(ours["policy_after"], torch_run["policy_after"]) < LOGPROB_TOL
    assert max_diff(ours["reference_after"], ours["logprobs"]) < 1e-3  # the reference did not move


def test_bf16_dpo_step_loss_and_grad_norm_match_torch(layout, torch_run):
    _, results = layout
    # bf16 rounding compounds over steps (two updates and an optimizer reset precede the SFT step): the first
    # step is held to 5% in the gradient norm, later ones to 10% (seen on an H200: 6% at the SFT step).
    for step, norm_tol in (("step1", 5e-2), ("step2", 1e-1), ("sft_step", 1e-1)):
        ours, ref = results[0][step], torch_run[step]
        assert set(ours) == set(ref)
        assert ours["loss"] == pytest.approx(ref["loss"], rel=2e-2), step
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=norm_tol), (step, ours, ref)
        assert ours.get("acc", 0) == pytest.approx(ref.get("acc", 0), abs=0.25), step
    for other in results[1:]:
        assert other["step1"] == results[0]["step1"]


def test_bf16_checkpoint_resumes(layout):
    ckpt, results = layout
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")  # the dtype the checkpoint was written in
    assert hf.dtype == torch.bfloat16
    state = hf.state_dict()
    assert all(torch.equal(state[name], t) for name, t in results[0]["weights"].items())
    assert json.loads((Path(ckpt) / "learner_state.json").read_text())["step"] == 1
    for r in results:  # the Adam moments came back: the same second step
        assert r["resumed_step2"]["loss"] == pytest.approx(r["step2"]["loss"], rel=1e-3)
        assert r["resumed_step2"]["grad_norm"] == pytest.approx(r["step2"]["grad_norm"], rel=1e-2)
    policy, reference = results[0]["updated"]
    assert max_diff(policy, reference) < 1e-3  # update_reference copied the policy
