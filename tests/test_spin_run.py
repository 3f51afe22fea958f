"""SPIN end to end on the toy world: two iterations with the previous iteration's generations mixed in,
refit by the collective transport over gloo."""

import json
import math

import pytest

from conftest import TOY_TEST_OVERRIDES
from orchestration import load_config, run

pytestmark = pytest.mark.slow
GBS = 8


@pytest.fixture(scope="module")
def spin_run(ray_session, toy_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("spin")
    cfg = load_config([
        "algorithm=spin", f"output_dir={out}", f"model.toy.cache_dir={toy_cache}", "logger.wandb.mode=offline",
        *TOY_TEST_OVERRIDES, f"algorithm.global_batch_size={GBS}", "algorithm.micro_batch_size=4",
        "algorithm.max_iterations=2", "algorithm.ref_policy_kl_penalty=[0.1,0.5]", "spin.mix_previous_iteration=true",
        "algorithm.val_check_interval=4",
        "cluster.refit_transport=gloo",  # the collective refit path through the driver (object store: other runs)
    ])
    result = run(cfg)
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    return result, [r for r in rows if "train/loss" in r], rows


def test_each_iteration_starts_at_its_reference(spin_run):
    _, steps, _ = spin_run
    for it, beta in ((0, 0.1), (1, 0.5)):
        mine = [r for r in steps if r["train/iteration"] == it]
        assert mine and all(r["train/beta"] == beta for r in mine)
        # The reference is M_t, the weights the iteration starts from: the first step sits at Delta = 0.
        assert mine[0]["train/preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert mine[0]["train/rewards_chosen_mean"] == 0
    assert all(r["train/global_batch_pairs"] == GBS for r in steps)


def test_spin_metrics_and_previous_iteration_pairs(spin_run):
    result, steps, rows = spin_run
    for r in steps:
        assert 0 <= r["train/bad_valids_per_GBS"] <= 1
        assert "train/judge_parse_rate" not in r and "train/judge_tokens_per_s" not in r
    assert all(r["train/previous_iteration_pairs"] == 0 for r in steps if r["train/iteration"] == 0)
    assert sum(r["train/previous_iteration_pairs"] for r in steps if r["train/iteration"] == 1) > 0
    # Iteration 1 trains on its own pairs and iteration 0's: about twice the steps.
    it0, it1 = result.iterations[0], result.iterations[1]
    assert it1["pairs_trained"] > 1.5 * it0["pairs_trained"]
    kept = (result.output_dir / "spin" / "generations_iter_0.jsonl").read_text().splitlines()
    assert len(kept) == it0["pairs_trained"] + it0["unused_pairs"]  # every ended generation, once
    assert any("val/loss" in r for r in rows)
    table = [json.loads(x) for x in (result.output_dir / "table_train_generations.jsonl").read_text().splitlines()]
    assert table and all(t["chosen"] for t in table)


def test_spin_table_and_checkpoints(spin_run):
    result, _, _ = spin_run
    assert [c.name for c in result.checkpoints] == ["iter_0", "iter_1"]
    assert [r["iteration"] for r in result.iterations] == [0, 1, 2]
    assert all(r["judge_accuracy"] is None and r["judge_pairs"] is None for r in result.iterations)
