"""A run that cannot learn says so loudly and early, and stops: the judge's parse rate is warned about as it
happens, what the judge wrote is saved, and an iteration without a single step stops the run with why and
what to try (it once finished with exit code 0 having trained on nothing)."""

import json

import pytest

from conftest import TOY_TEST_OVERRIDES
from orchestration import RunFailed, load_config, run

pytestmark = pytest.mark.slow


def test_a_judge_that_never_scores_stops_the_run_with_what_to_try(ray_session, toy_cache, tmp_path):
    logs: list[str] = []
    cfg = load_config([
        f"output_dir={tmp_path}", f"model.toy.cache_dir={toy_cache}", "logger.wandb.mode=disabled",
        *TOY_TEST_OVERRIDES, "algorithm.max_iterations=1", "algorithm.limit_train_batches=3",
        "algorithm.global_batch_size=16", "algorithm.micro_batch_size=8",
        r"judge.reward_regex='Grade=(\d)'",  # the toy judge writes "Score: n": nothing parses
    ])
    with pytest.raises(RunFailed) as stop:
        run(cfg, log=logs.append)
    message = str(stop.value)
    assert "iteration 0 trained no step, so the run would learn nothing" in message
    assert "the judge gave a score in 0 of" in message and "judge.backend" in message
    assert "table_judgements.jsonl" in message
    warned = [line for line in logs if "WARNING: only 0 of" in line]
    assert len(warned) == 1 and "judgements so far gave a score" in warned[0]  # once, while it happened
    rows = [json.loads(line) for line in (tmp_path / "table_judgements.jsonl").read_text().splitlines()]
    # What the judge wrote is kept, so the user can see the "Score: n" the regex missed (the test world's
    # small judge now and then runs out of tokens before its score line).
    assert rows and all(r["kind"] == "judge" and r["parsed"] is None for r in rows)
    assert sum("Score:" in r["text"] for r in rows) > len(rows) // 2
    assert (tmp_path / "table_train_generations.jsonl").read_text() == ""  # written, with no pair to show
    assert not (tmp_path / "run_complete.json").exists()
