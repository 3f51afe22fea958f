"""Self-Rewarding end to end on the toy world with the megatron learner at tensor parallel 2 (2 workers), its
judge pool and collective refits over gloo (both ranks take part in gathering the weights)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TOY_TEST_OVERRIDES
from learner.backends import megatron
from orchestration import load_config, run

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not megatron.available(), reason=f"needs megatron-core: {megatron.INSTALL_HINT}")]
GBS = 8


@pytest.fixture(scope="module")
def megatron_run(ray_session, toy_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron_run")
    cfg = load_config([
        f"output_dir={out}", f"model.toy.cache_dir={toy_cache}", "logger.wandb.mode=disabled", *TOY_TEST_OVERRIDES,
        "learner.backend=megatron", "learner.tensor_parallel=2", "cluster.learner.workers=2",
        f"algorithm.global_batch_size={GBS}", "algorithm.micro_batch_size=4", "algorithm.max_iterations=2",
        "algorithm.limit_train_batches=0.5",
        "cluster.refit_transport=gloo",  # docs/megatron.md's GPU layout refits by NCCL: the same code on CPU
    ])
    result = run(cfg)
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    return result, [r for r in rows if "train/loss" in r]


def test_both_iterations_train_from_their_reference(megatron_run):
    _, steps = megatron_run
    for it in (0, 1):
        mine = [r for r in steps if r["train/iteration"] == it]
        assert mine, f"iteration {it} trained no step"
        # update_reference at the boundary: each iteration's first step sits at Delta = 0.
        assert mine[0]["train/preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert mine[0]["train/rewards_chosen_mean"] == 0
    assert all(r["train/global_batch_pairs"] == GBS and r["train/grad_norm"] > 0 for r in steps)


def test_checkpoints_are_hugging_face_and_differ(megatron_run):
    result, _ = megatron_run
    assert [c.name for c in result.checkpoints] == ["iter_0", "iter_1"]
    states = []
    for ckpt in result.checkpoints:
        states.append(AutoModelForCausalLM.from_pretrained(ckpt).state_dict())
        learner_state = json.loads((ckpt / "learner_state.json").read_text())
        assert learner_state["backend"] == "megatron" and learner_state["tensor_parallel"] == 2
        assert (ckpt / "optimizer.pt").is_file() and (ckpt / "tokenizer_config.json").is_file()
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert [r["iteration"] for r in result.iterations] == [0, 1, 2]
    assert all(r["task_accuracy"] is not None for r in result.iterations)
