"""Nothing lost (SPEC section 9): a run killed at any point resumes to the result of an uninterrupted run,
bit for bit on CPU; dead generator and judge replicas are restarted and their work re-issued; a dead learner
worker stops the run with a message, and the next start resumes.

The runs are subprocesses of the CLI (a killed driver must be a real process) joined to the test session's
Ray cluster; they use the session's toy world.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from safetensors.torch import load_file

from conftest import TOY_TEST_OVERRIDES
from orchestration import load_config, run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
# Wall-clock metrics, the only fields two runs may differ in: step times, throughput, and the judge calls
# answered before each step with their latency (judge/<backend>/calls, latency_s, latency_max_s, meta_...).
TIMING = ("step_time", "_per_s", "calls", "latency_s", "latency_max_s")


def overrides(toy_cache, out, *extra):
    return ["algorithm=meta_rewarding", f"output_dir={out}", f"model.toy.cache_dir={toy_cache}",
            "logger.wandb.mode=disabled", *TOY_TEST_OVERRIDES, "algorithm.global_batch_size=8",
            "algorithm.micro_batch_size=4", "algorithm.meta_judge_pcnt=0.25", "algorithm.max_iterations=2",
            "algorithm.save_interval=2", "algorithm.rollout_batch_size=8", "algorithm.limit_train_batches=7",
            "algorithm.num_evals_to_average=2", "checkpoint.keep_last=1",
            "cluster.health_check_interval_s=5", *extra]


def start(args, crash_at=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SELFREWARD_CRASH_AT", None)
    if crash_at:
        env["SELFREWARD_CRASH_AT"] = crash_at
    address = ray.get_runtime_context().gcs_address
    return subprocess.Popen([sys.executable, "-m", "orchestration.main", *args, f"cluster.address={address}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in rows]


def weights(out: Path) -> dict:
    return load_file(str(out / "checkpoints" / "iter_1" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k


@pytest.fixture(scope="module")
def reference_run(ray_session, toy_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run(load_config(overrides(toy_cache, out)))
    return out, result


def test_killed_at_every_kind_of_point_resumes_bit_for_bit(reference_run, toy_cache, tmp_path):
    ref_out, _ = reference_run
    args = overrides(toy_cache, tmp_path)
    # Each start is killed with SIGKILL at one point and the next start resumes: before the first checkpoint
    # (mid-generation), mid-step, half-way through writing a checkpoint, and between an iteration's
    # checkpoint and its refit.
    logs = []
    for crash_at in ("generation:3", "step:4", "checkpoint:2", "boundary:1"):
        code, log = finish(start(args, crash_at))
        logs.append(log)
        assert code == -signal.SIGKILL, f"{crash_at}: exited {code} without reaching the crash point:\n{log[-3000:]}"
    code, log = finish(start(args))
    assert code == 0, log[-3000:]
    assert "starting from the beginning" in logs[1]  # the first crash came before any checkpoint
    assert any("removed incomplete checkpoint files" in x for x in logs[3:] + [log])  # the torn checkpoint
    assert metric_rows(tmp_path) == metric_rows(ref_out)
    assert_same_weights(weights(tmp_path), weights(ref_out))
    # keep_last=1: one step checkpoint left; both iteration ends kept
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert [n for n in names if n.startswith("iter_")] == ["iter_0", "iter_1"]
    assert len([n for n in names if n.startswith("step_")]) == 1
    assert not [n for n in names if n.endswith((".partial", ".old", ".tmp"))]


def test_with_the_rollout_journal_a_resumed_run_replays_what_the_stopped_run_got(reference_run, toy_cache,
                                                                                tmp_path):
    # checkpoint.record_rollouts (on by itself with trtllm): killed after the step-4 checkpoint, with later
    # chunks judged and recorded; the resumed run takes those from the journal, not from the pools.
    ref_out, _ = reference_run
    args = overrides(toy_cache, tmp_path, "checkpoint.record_rollouts=true")
    code, log = finish(start(args, "step:6"))
    assert code == -signal.SIGKILL, log[-3000:]
    assert "recording what the pools return" in log
    code, log = finish(start(args))
    assert code == 0, log[-3000:]
    assert "answered from the rollout journal" in log
    assert metric_rows(tmp_path) == metric_rows(ref_out)
    assert_same_weights(weights(tmp_path), weights(ref_out))
    assert not list((tmp_path / "rollout_journal").glob("iter_*"))  # ended iterations' entries are dropped


def ray_processes(kind: str, busy: bool = False) -> list[int]:
    """PIDs of Ray worker processes running actors of `kind` (their process title is ray::<kind>, and
    ray::<kind>.<method> while a call runs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(f"ray::{kind}") and (not busy or cmd.startswith(f"ray::{kind}.")):
                pids.append(int(entry.name))
    return pids


def kill_busy(kind: str, proc, timeout=120) -> None:
    """SIGKILL the replica of `kind` while it runs a call (so there is work in flight to re-issue)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = ray_processes(kind, busy=True)
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.005)
    raise AssertionError(f"no busy {kind} within {timeout}s")


def wait_for_step(out: Path, step: int, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        if path.exists() and any(json.loads(x).get("step", 0) >= step and "train/loss" in x
                                 for x in path.read_text().splitlines()):
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_dead_generator_and_judge_replicas_are_restarted_and_nothing_is_lost(reference_run, toy_cache, tmp_path):
    ref_out, _ = reference_run
    # Few prompts ahead of the learner: generation and judging go on through the whole iteration.
    proc = start(overrides(toy_cache, tmp_path, "algorithm.max_prompts_ahead=16"))
    wait_for_step(tmp_path, 1, proc)
    kill_busy("GeneratorActor", proc)
    kill_busy("JudgeActor", proc)
    code, log = finish(proc)
    assert code == 0, log[-3000:]
    assert "generator replica 0 died" in log and "judge replica 0 died" in log
    rows = metric_rows(tmp_path)
    ref_rows = metric_rows(ref_out)
    assert max(r.get("train/actor_restarts", 0) for r in rows) >= 2
    pairs = lambda rs: [r["train/global_batch_pairs"] for r in rs if "train/global_batch_pairs" in r]  # noqa: E731
    assert sum(pairs(rows)) == sum(pairs(ref_rows))
    # Re-issued calls carry the same seeds, so even the weights come out the same.
    assert_same_weights(weights(tmp_path), weights(ref_out))
    assert [{k: v for k, v in r.items() if k != "train/actor_restarts"} for r in rows] == \
        [{k: v for k, v in r.items() if k != "train/actor_restarts"} for r in ref_rows]


def test_dead_learner_worker_stops_the_run_and_the_next_start_resumes(reference_run, toy_cache, tmp_path):
    ref_out, _ = reference_run
    args = overrides(toy_cache, tmp_path)
    proc = start(args)
    wait_for_step(tmp_path, 3, proc)  # past the step-2 checkpoint
    pids = ray_processes("LearnerWorker")
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    code, log = finish(proc, timeout=300)
    assert code == 1, log[-3000:]
    assert "the run stopped" in log and "learner worker" in log and "run the same command again" in log
    code, log = finish(start(args))
    assert code == 0, log[-3000:]
    assert "resuming from" in log
    assert metric_rows(tmp_path) == metric_rows(ref_out)
    assert_same_weights(weights(tmp_path), weights(ref_out))


def test_time_limit_and_sigterm_stop_cleanly_and_resume_exactly(reference_run, toy_cache, tmp_path):
    ref_out, _ = reference_run
    args = overrides(toy_cache, tmp_path)
    # Well inside the run (the uninterrupted one takes about 19 s from start to end on 2 cores).
    code, log = finish(start([*args, "max_time_per_run=00:00:12"]))
    assert code == 0 and "stopped cleanly (max_time_per_run (12s) reached)" in log, log[-3000:]
    first = max([r["step"] for r in metric_rows(tmp_path) if "train/loss" in r], default=0)
    proc = start(args)
    wait_for_step(tmp_path, first + 2, proc)  # rows beyond what the first start wrote: this start's
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc)
    assert code == 0 and "stopped cleanly (SIGTERM received)" in log, log[-3000:]
    assert "resuming from" in log
    code, log = finish(start(args))
    assert code == 0, log[-3000:]
    assert metric_rows(tmp_path) == metric_rows(ref_out)
    assert_same_weights(weights(tmp_path), weights(ref_out))
