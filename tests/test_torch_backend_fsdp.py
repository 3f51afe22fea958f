"""learner.sharding=fsdp2 against the DDP path of the torch backend: two gloo ranks on the CPU.

Both run the shared scenario (tests/megatron_harness.py: log-probs, a DPO step, export, SFT NLL, save, a
second step, reference update, optimizer reset, an SFT step) in the same two spawned processes, on a tied
Llama (its 255-row embedding splits unevenly over two ranks) and an untied Qwen2 (QKV biases). Then each
FSDP2 run resumes from its own checkpoint and from the DDP run's checkpoint.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from learner.backends.torch_backend import TorchBackend
from learner.types import LossConfig, OptimConfig, TrainSample
from megatron_harness import pairs, run_ranks, scenario

VOCAB = 255
OPTIM = OptimConfig(lr=1e-2, warmup_steps=2, micro_batch_size=2, max_grad_norm=1.0)
LOSS = LossConfig(beta=0.5, sft_loss_weight=0.3)
MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, tie_word_embeddings=True)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, tie_word_embeddings=False)),
}
BATCHES = (pairs(4, seed=1, vocab=VOCAB), pairs(4, seed=2, vocab=VOCAB))


def _all_rng_states(backend):
    import torch.distributed as dist

    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, backend.rng_state())
    return states


def _rank(rank, world, model_dirs, ckpt_root):
    out = {}
    share = lambda batch: batch[rank * 2 : (rank + 1) * 2]  # noqa: E731
    for name, model_dir in model_dirs.items():
        runs = {}
        for sharding in ("ddp", "fsdp2"):
            torch.manual_seed(0)
            backend = TorchBackend(model_dir, OPTIM, rank=rank, world_size=world, sharding=sharding)
            runs[sharding] = scenario(backend, share, f"{ckpt_root}/{name}-{sharding}", _all_rng_states, BATCHES,
                                      LOSS)
            # Uneven shares (as LearnerGroup.sft_nll cuts them): rank 0 runs two micro-batches, rank 1 one.
            uneven = BATCHES[0][:3] if rank == 0 else BATCHES[0][3:]
            runs[sharding]["sft_nll_uneven"] = backend.sft_nll(uneven)
            runs[sharding]["gathers_weights"] = backend.gathers_weights
        for source in ("ddp", "fsdp2"):  # resume the FSDP2 learner from either path's checkpoint
            ckpt = f"{ckpt_root}/{name}-{source}"
            resumed = TorchBackend(ckpt, OPTIM, rank=rank, world_size=world, sharding="fsdp2",
                                   reference_dir=model_dirs[name])
            resumed.load_training_state(ckpt)
            runs["fsdp2"][f"resumed_from_{source}"] = resumed.train_step(share(BATCHES[1]), LOSS)
        out[name] = runs
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    model_dirs = {}
    for name, (cls, config) in MODELS.items():
        model_dirs[name] = str(root / name)
        torch.manual_seed(0)
        cls(config).save_pretrained(model_dirs[name])
    ckpts = root / "ckpts"
    ckpts.mkdir()
    return run_ranks(_rank, 2, model_dirs, str(ckpts)), ckpts


def close(a: list[list[float]], b: list[list[float]], tol: float) -> bool:
    return [len(r) for r in a] == [len(r) for r in b] and all(
        abs(x - y) <= tol for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.parametrize("model", list(MODELS))
def test_steps_equal_ddp_loss_grad_norm_and_metrics(results, model):
    ranks, _ = results
    ddp, fsdp = ranks[0][model]["ddp"], ranks[0][model]["fsdp2"]
    for step in ("step1", "step2", "sft_step"):
        assert set(fsdp[step]) == set(ddp[step])
        assert fsdp[step]["loss"] == pytest.approx(ddp[step]["loss"], rel=1e-6)
        assert fsdp[step]["grad_norm"] == pytest.approx(ddp[step]["grad_norm"], rel=1e-5)
        for key, value in ddp[step].items():
            assert fsdp[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
    assert fsdp["sft_nll"] == pytest.approx(ddp["sft_nll"], rel=1e-6)
    assert fsdp["sft_nll_uneven"] == pytest.approx(ddp["sft_nll_uneven"], rel=1e-6)
    assert fsdp["sft_nll_uneven"][1] == sum(len(s.chosen_ids) for s in BATCHES[0])  # every token, once
    for other in ranks[1:]:  # metrics are global: every rank returns the same
        assert other[model]["fsdp2"]["step2"] == fsdp["step2"]


@pytest.mark.parametrize("model", list(MODELS))
def test_weights_and_log_probs_after_steps_equal_ddp(results, model):
    ranks, _ = results
    ddp, fsdp = ranks[0][model]["ddp"], ranks[0][model]["fsdp2"]
    assert close(fsdp["logprobs"], ddp["logprobs"], 1e-6)
    assert close(fsdp["policy_after"], ddp["policy_after"], 1e-5)
    assert close(fsdp["reference_after"], ddp["logprobs"], 1e-6)  # the reference did not move
    assert not close(fsdp["policy_after"], fsdp["logprobs"], 1e-3)  # the policy did
    policy, reference = fsdp["updated"]
    assert close(policy, reference, 0.0)  # update_reference copied the shards
    assert close(policy, ddp["updated"][0], 1e-5)
    assert fsdp["lr_after_reset"] == ddp["lr_after_reset"] == OPTIM.lr / OPTIM.warmup_steps


@pytest.mark.parametrize("model", list(MODELS))
def test_export_is_gathered_on_rank_zero_and_equals_ddp(results, model):
    ranks, _ = results
    ddp, fsdp = ranks[0][model]["ddp"]["weights"], ranks[0][model]["fsdp2"]["weights"]
    assert list(fsdp) == list(ddp)  # Hugging Face names in the same order; a tied lm_head left out
    assert ("lm_head.weight" in fsdp) == (model == "qwen2")
    for name, tensor in ddp.items():
        assert fsdp[name].shape == tensor.shape and fsdp[name].dtype == tensor.dtype
        assert torch.allclose(fsdp[name], tensor, atol=1e-6, rtol=0), name
    assert ranks[1][model]["fsdp2"]["weights"] == {}  # gathered to rank 0 only
    assert ranks[0][model]["fsdp2"]["gathers_weights"] and not ranks[0][model]["ddp"]["gathers_weights"]


@pytest.mark.parametrize("model", list(MODELS))
def test_checkpoint_is_unsharded_and_resumes_exactly(results, model):
    ranks, ckpts = results
    ckpt = ckpts / f"{model}-fsdp2"
    state = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    for name, tensor in ranks[0][model]["fsdp2"]["weights"].items():
        assert torch.equal(state[name], tensor), name  # float32: the export after step 1 is the saved masters
    assert json.loads((ckpt / "learner_state.json").read_text()) == {"step": 1, "world_size": 2}
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=False)["optimizer"]
    ddp_optimizer = torch.load(ckpts / f"{model}-ddp" / "optimizer.pt", weights_only=False)["optimizer"]
    assert optimizer["state"].keys() == ddp_optimizer["state"].keys()
    for index, moments in ddp_optimizer["state"].items():  # the same unsharded layout as ddp's
        for key, value in moments.items():
            assert optimizer["state"][index][key].shape == value.shape, (index, key)
            assert torch.allclose(optimizer["state"][index][key], value, atol=1e-7, rtol=1e-5), (index, key)
    for r in ranks:
        run = r[model]["fsdp2"]
        assert run["resumed_from_fsdp2"] == run["step2"]  # bit-exact: masters, moments, step and RNG
        for key, value in run["step2"].items():
            assert run["resumed_from_ddp"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_an_unknown_sharding_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"learner.sharding='zero3' is not one of: ddp, fsdp2"):
        TorchBackend(str(tmp_path), OPTIM, sharding="zero3")


def test_one_worker_has_nothing_to_shard(tmp_path):
    cls, config = MODELS["llama"]
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    backend = TorchBackend(str(tmp_path), OPTIM, sharding="fsdp2")
    assert not backend.gathers_weights and backend.model is backend.policy
    sft = [TrainSample(s.prompt_ids, s.chosen_ids) for s in BATCHES[0]]
    assert backend.train_step(sft, LossConfig(preference_loss_weight=0.0, sft_loss_weight=1.0))["loss"] > 0
