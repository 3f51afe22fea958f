"""The megatron learner backend against the torch backend on the same tiny models (CPU, gloo ranks).

Each layout (tensor parallel, pipeline parallel, data parallel) runs one scenario in spawned ranks:
log-probs, a DPO step, export, save, a second step, resume from the checkpoint, reference update,
optimizer reset. The torch backend runs the same scenario in-process; the numbers must agree.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from learner.backends import megatron
from learner.backends.torch_backend import TorchBackend
from learner.types import LossConfig, OptimConfig
from megatron_harness import megatron_rank, pairs, run_ranks, scenario

pytestmark = pytest.mark.skipif(not megatron.available(), reason=f"needs megatron-core: {megatron.INSTALL_HINT}")

VOCAB = 255  # odd: tensor parallelism pads the vocabulary to 256 and must mask the padding row
OPTIM = OptimConfig(lr=1e-2, warmup_steps=2, micro_batch_size=2, max_grad_norm=1.0)
LOSS = LossConfig(beta=0.5, sft_loss_weight=0.3)
MODELS = {
    # GQA, tied embeddings
    "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, tie_word_embeddings=True)),
    # sliding-window attention (window 4 < the test sequences), untied output layer
    "mistral": (MistralForCausalLM, MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=64, sliding_window=4)),
    # QKV bias, untied output layer
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, tie_word_embeddings=False)),
}
LAYOUTS = {  # name: (model, tensor_parallel, pipeline_parallel, world size)
    "llama-tp1": ("llama", 1, 1, 1),
    "llama-tp2": ("llama", 2, 1, 2),
    "llama-pp2": ("llama", 1, 2, 2),
    "mistral-dp2": ("mistral", 1, 1, 2),
    "qwen2-tp2": ("qwen2", 2, 1, 2),
}
BATCHES = (pairs(4, seed=1, vocab=VOCAB), pairs(4, seed=2, vocab=VOCAB))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for name, (cls, config) in MODELS.items():
        dirs[name] = str(tmp_path_factory.mktemp(name))
        torch.manual_seed(0)
        cls(config).save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def torch_runs(model_dirs, tmp_path_factory):
    runs = {}
    for name, model_dir in model_dirs.items():
        backend = TorchBackend(model_dir, OPTIM)
        ckpt = str(tmp_path_factory.mktemp(f"torch-{name}") / "ckpt")
        runs[name] = scenario(backend, lambda b: b, ckpt, lambda be: [be.rng_state()], BATCHES, LOSS)
    return runs


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, model_dirs, tmp_path_factory):
    model, tp, pp, world = LAYOUTS[request.param]
    ckpt = str(tmp_path_factory.mktemp(request.param) / "ckpt")
    results = run_ranks(megatron_rank, world, model_dirs[model], ckpt, OPTIM, LOSS, BATCHES, tp, pp)
    return model, ckpt, results, (tp, pp)


def close(a: list[list[float]], b: list[list[float]], tol: float) -> bool:
    return [len(r) for r in a] == [len(r) for r in b] and all(
        abs(x - y) <= tol for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_logprobs_match_torch_before_and_after_a_step(layout, torch_runs):
    model, _, results, _ = layout
    ours, ref = results[0], torch_runs[model]
    assert close(ours["logprobs"], ref["logprobs"], 1e-5)
    assert close(ours["policy_after"], ref["policy_after"], 1e-4)
    assert close(ours["reference_after"], ref["logprobs"], 1e-5)  # the reference did not move
    assert not close(ours["policy_after"], ours["logprobs"], 1e-3)  # the policy did


def test_dpo_and_sft_steps_loss_grad_norm_and_metrics_match_torch(layout, torch_runs):
    model, _, results, _ = layout
    ours, ref = results[0], torch_runs[model]
    for step in ("step1", "step2", "sft_step"):
        assert set(ours[step]) == set(ref[step])
        assert ours[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5)
        assert ours[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-5)
        for key, value in ref[step].items():
            assert ours[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    assert ours["step1"]["preference_loss"] == pytest.approx(math.log(2))  # pi == pi_ref at the first step
    assert "preference_loss" not in ours["sft_step"] and ours["sft_step"]["loss"] == ours["sft_step"]["sft_loss"]
    assert ours["sft_nll"] == pytest.approx(ref["sft_nll"], rel=1e-5)


def test_every_rank_returns_the_same_metrics(layout):
    _, _, results, _ = layout
    for other in results[1:]:
        assert other["step1"] == results[0]["step1"] and other["step2"] == results[0]["step2"]
        assert other["sft_nll"] == results[0]["sft_nll"]
        assert other["logprobs"] == results[0]["logprobs"]  # every pipeline stage gets the last stage's values
        assert other["weights"] == {}  # exports come from rank 0 only


def test_export_has_hf_names_and_the_trained_weights(layout, torch_runs):
    model, _, results, _ = layout
    ours, ref = results[0]["weights"], torch_runs[model]["weights"]
    assert sorted(ours) == sorted(ref)  # Hugging Face names; a tied lm_head is left out
    for name, tensor in ref.items():
        assert ours[name].shape == tensor.shape and ours[name].dtype == tensor.dtype
        # One Adam step moves each weight by about lr * sign(grad): bounded by lr, and grads that are ~0
        # in both backends may take either sign.
        assert torch.allclose(ours[name], tensor, atol=OPTIM.lr / 10), name


def test_checkpoint_loads_in_transformers_and_resumes_exactly(layout):
    _, ckpt, results, (tp, pp) = layout
    hf = AutoModelForCausalLM.from_pretrained(ckpt)
    state = hf.state_dict()
    for name, tensor in results[0]["weights"].items():
        assert torch.equal(state[name], tensor), name
    learner_state = json.loads((Path(ckpt) / "learner_state.json").read_text())
    assert learner_state == {"step": 1, "world_size": len(results), "backend": "megatron", "tensor_parallel": tp,
                             "pipeline_parallel": pp}
    optimizer = torch.load(Path(ckpt) / "optimizer.pt", weights_only=False)["ranks"]
    data_parallel = len(results) // (tp * pp)
    for blob in optimizer.values():  # with DP > 1 the distributed optimizer's gathered state is in it
        assert ("parameters" in blob) == (data_parallel > 1)
    for r in results:  # optimizer moments, step count and schedule restored: the same second step
        assert r["resumed_step2"] == r["step2"]


def test_update_reference_and_reset_optimizer(layout, torch_runs):
    model, _, results, _ = layout
    policy, reference = results[0]["updated"]
    assert policy == reference
    assert results[0]["lr_after_reset"] == torch_runs[model]["lr_after_reset"] == OPTIM.lr / OPTIM.warmup_steps
