"""Self-Rewarding on a real pretrained instruct model (SmolLM2-135M-Instruct, the `smollm2` fixture).

With the default rubric the 135M model never writes a parsable score, so the run must stop and say why
(it once ran to exit 0 having trained on nothing). With a short template and a pattern that reads what it
does write ("The answer is 4.5 out of 5."), its judge scores and an iteration trains.
"""

from __future__ import annotations

import json

import pytest

from orchestration import RunFailed, load_config, run

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 3?",
             "Give a synonym for happy.", "Who wrote Romeo and Juliet?", "What is the boiling point of water?"]
SHORT_TEMPLATE = ("Rate how good this answer is, from 0 (useless) to 5 (perfect).\nQuestion: {prompt}\n"
                  "Answer: {response}\nWrite only \"Score: \" and a number.")
SMALL = ["model=hf", "algorithm.max_iterations=1", "algorithm.num_responses_to_gen=2",
         "algorithm.num_evals_to_average=2", "algorithm.global_batch_size=1", "algorithm.micro_batch_size=1",
         "cluster.learner.workers=1", "algorithm.sampling.max_new_tokens=64", "model.max_seq_len=512",
         "cluster.generators.max_batch_size=8", "cluster.judges.max_batch_size=8", "logger.wandb.mode=disabled",
         "learner.optim.lr=1e-5", "learner.optim.warmup_steps=0"]


def _data(tmp_path, count: int) -> str:
    """Prompts asking for one sentence: sampled answers then end well inside max_new_tokens."""
    path = tmp_path / "prompts.jsonl"
    system = {"role": "system", "content": "You answer in one short sentence."}
    path.write_text("".join(json.dumps({"messages": [system, {"role": "user", "content": q}]}) + "\n"
                            for q in QUESTIONS[:count]))
    return str(path)


def test_the_default_rubric_stops_the_run_with_what_to_try(ray_session, smollm2, tmp_path):
    cfg = load_config([*SMALL, f"model.path={smollm2}", f"data.train_file={_data(tmp_path, 4)}",
                       f"output_dir={tmp_path / 'out'}", "judge.sampling.max_new_tokens=48"])
    with pytest.raises(RunFailed, match=r"iteration 0 trained no step.*the judge gave a score in 0 of \d+ "
                                        r"judgements \(0%\).*judge.template"):
        run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "out" / "table_judgements.jsonl").read_text().splitlines()]
    assert rows and all(r["parsed"] is None and r["text"] for r in rows)  # what it wrote instead, kept


def test_a_short_template_scores_and_trains(ray_session, smollm2, tmp_path):
    template = tmp_path / "judge.txt"
    template.write_text(SHORT_TEMPLATE)
    cfg = load_config([*SMALL, f"model.path={smollm2}", f"data.train_file={_data(tmp_path, 6)}",
                       f"output_dir={tmp_path / 'out'}", f"judge.template={template}",
                       r"judge.reward_regex='(\d+(?:\.\d+)?)'", "judge.sampling.max_new_tokens=12"])
    result = run(cfg)
    rows = [json.loads(x) for x in result.metrics_file.read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert steps, "no step trained"
    assert result.iterations[0]["judge_parse_rate"] > 0.5  # over the iteration (a step's batch holds few)
    assert [c.name for c in result.checkpoints] == ["iter_0"]
