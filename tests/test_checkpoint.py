"""Checkpoint files: atomic publication, recovery after a crash mid-write, pruning; the pieces of run
state that must survive a JSON round trip exactly; max_time_per_run parsing; metrics cut back on resume."""

import json
import os

import pytest

from learner.types import TrainSample
from orchestration.batching import GlobalBatcher, OutcomeStats, PromptOutcome
from orchestration.checkpoint import Checkpoints
from orchestration.config import ConfigError, max_seconds
from orchestration.metrics import MetricsLogger
from orchestration.stopping import Stopper


def fake_learner(files=("model.safetensors",)):
    def write(path):
        os.makedirs(path)
        for name in files:
            with open(os.path.join(path, name), "w") as f:
                f.write(path)
    return write


def test_save_publishes_complete_checkpoints_in_order(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=None)
    ckpts.save("step_3", fake_learner(), {"phase": "mid", "step": 3})
    ckpts.save("iter_0", fake_learner(), {"phase": "end", "step": 5})
    assert [c.name for c in ckpts.complete()] == ["step_3", "iter_0"]
    assert ckpts.latest().state["step"] == 5 and ckpts.latest().state["serial"] == 2
    assert Checkpoints(tmp_path, None).latest().name == "iter_0"  # the serial continues across starts
    ckpts.save("step_3", fake_learner(), {"phase": "mid", "step": 3})  # the same name again replaces it
    assert [c.name for c in ckpts.complete()] == ["iter_0", "step_3"]


def test_a_crash_while_writing_leaves_the_previous_checkpoints(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=None)
    ckpts.save("step_2", fake_learner(), {"phase": "mid", "step": 2})
    # A crash half-way through the next one: learner files written, no run state yet.
    fake_learner()(str(tmp_path / "checkpoints" / "step_4.partial"))
    (tmp_path / "checkpoints" / "step_6.old").mkdir()
    assert ckpts.latest().name == "step_2"
    assert sorted(ckpts.recover()) == ["step_4.partial", "step_6.old"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]


def test_a_crash_between_the_renames_is_completed(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=None)
    partial = tmp_path / "checkpoints" / "step_4.partial"
    fake_learner()(str(partial))
    (partial / "run_state.json").write_text(json.dumps({"phase": "mid", "step": 4, "serial": 1}))
    assert ckpts.recover() == []
    assert ckpts.latest().name == "step_4"


def test_keep_last_prunes_step_checkpoints_only(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=2)
    for step in (2, 4):
        ckpts.save(f"step_{step}", fake_learner(), {"phase": "mid", "step": step})
    ckpts.save("iter_0", fake_learner(), {"phase": "end", "step": 5})
    for step in (6, 8):
        ckpts.save(f"step_{step}", fake_learner(), {"phase": "mid", "step": step})
    assert [c.name for c in ckpts.complete()] == ["iter_0", "step_6", "step_8"]


def test_named_resume_must_be_complete(tmp_path):
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        Checkpoints.named(str(tmp_path))


def test_batcher_state_round_trips_through_json_exactly():
    batcher = GlobalBatcher(4, judge_pair_cap=1)
    third = 1 / 3  # scores must survive the text form to the last bit (rpo losses use them)
    for i in range(3):
        batcher.add(PromptOutcome(OutcomeStats(prompts=1, responses=4, judgements=12), TrainSample([i], [1, 2], [3], 4 + third, 1.0),
                                  judge_sample=TrainSample([9, i], [5], [6], 2.0, third) if i == 1 else None,
                                  epoch=0, prompt_text=f"p{i}", chosen_text="c", rejected_text="r"))
    batcher.add(PromptOutcome(OutcomeStats(prompts=1, bad_samples=1), reason="all equal"))
    restored = GlobalBatcher(4, judge_pair_cap=1)
    restored.restore(json.loads(json.dumps(batcher.state())))
    assert restored.state() == batcher.state()
    batcher.add(PromptOutcome(OutcomeStats(prompts=1), TrainSample([7], [1], [2], 3.0, 1.0)))
    restored.add(PromptOutcome(OutcomeStats(prompts=1), TrainSample([7], [1], [2], 3.0, 1.0)))
    a, b = batcher.pop(), restored.pop()
    assert a.samples == b.samples and a.stats == b.stats


@pytest.mark.parametrize("text, seconds", [("90", 90), ("00:01:30", 90), ("01:00:00:00", 86400), ("1:02:03", 3723)])
def test_max_time_per_run_forms(text, seconds):
    assert max_seconds(text) == seconds


@pytest.mark.parametrize("text", ["soon", "1:2:3:4:5", "0", "-5"])
def test_max_time_per_run_rejects_nonsense(text):
    with pytest.raises(ConfigError, match="max_time_per_run"):
        max_seconds(text)


def test_stopper_reports_the_time_limit():
    assert Stopper(None).requested() is None
    assert "max_time_per_run" in Stopper(1.0, started=0.0).requested()


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    m = MetricsLogger(tmp_path, "disabled", "p", None, {})
    m.log({"a": 1}, 1)
    m.table("table/x", ["c"], [[1]], 1)
    m.flush()
    sizes = m.sizes()
    m.log({"a": 2}, 2)
    m.table("table/x", ["c"], [[2]], 2)
    m.close()
    resumed = MetricsLogger(tmp_path, "disabled", "p", None, {}, resume_sizes=sizes)
    resumed.close()
    assert [json.loads(x)["a"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (tmp_path / "table_x.jsonl").read_text().splitlines() == ['{"c": 1}']
