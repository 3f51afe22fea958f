"""The whole loop on a local Ray cluster: toy world, 1 generator, 1 judge, 2 learner workers, 2 iterations."""

import json

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from orchestration import load_config, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config([
        f"output_dir={out}", f"model.toy.cache_dir={cache}", "logger.wandb.mode=offline",
        "model.toy.train_prompts=96", "model.toy.val_prompts=32", "model.toy.bootstrap_steps=250",
        "algorithm.global_batch_size=8", "algorithm.micro_batch_size=4", "algorithm.rollout_batch_size=16",
        "algorithm.max_iterations=2",
    ])
    return cfg, run(cfg)


def test_run_writes_checkpoints_metrics_and_table(finished_run):
    cfg, result = finished_run
    assert len(result.checkpoints) == 2
    for ckpt in result.checkpoints:
        model = AutoModelForCausalLM.from_pretrained(ckpt)  # a loadable Hugging Face checkpoint
        assert model.config.model_type == "llama"
        assert (ckpt / "optimizer.pt").is_file() and (ckpt / "tokenizer_config.json").is_file()
    # The two iterations trained different weights.
    w0, w1 = (load_file(str(c / "model.safetensors")) for c in result.checkpoints)
    assert any(not (w0[k] == w1[k]).all() for k in w0)

    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert steps, "no training step was logged"
    for r in steps:
        assert r["train/global_batch_pairs"] == 8  # exact global batches
        for key in ("train/acc", "train/rewards_chosen_mean", "train/bad_samples_per_GBS",
                    "train/judge_parse_rate", "train/pairs_per_s", "train/generator_tokens_per_s"):
            assert key in r
    assert [r["step"] for r in steps] == sorted(r["step"] for r in steps)
    assert {r["train/iteration"] for r in steps} <= {0, 1}
    assert any("val/loss" in r for r in rows)
    # Per-iteration rows plus the final model's accuracy.
    assert [r["iteration"] for r in result.iterations] == [0, 1, 2]
    assert all(r["task_accuracy"] is not None for r in result.iterations)


def test_first_step_starts_at_the_reference(finished_run):
    _, result = finished_run
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    first = next(r for r in rows if "train/preference_loss" in r)
    # pi == pi_ref before the first update: DPO loss is ln 2 and implicit rewards are 0.
    assert abs(first["train/preference_loss"] - 0.693147) < 1e-4
    assert abs(first["train/rewards_chosen_mean"]) < 1e-6


def test_rerunning_a_finished_run_does_nothing(finished_run):
    cfg, result = finished_run
    again = run(cfg)
    assert again.iterations == result.iterations
