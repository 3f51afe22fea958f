"""Streaming refits (SPEC 8b, docs/streaming.md) on the toy world: every pair carries its weight version and the
lag bound holds, whatever the replicas' speed (the schedule does not depend on timing); a run killed
mid-iteration resumes bit for bit; a replica restarted between refits re-issues its work at the right
version; SPIN streams too.

The killed runs are subprocesses of the CLI joined to the test session's Ray cluster (as in test_resume.py).
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import TOY_TEST_OVERRIDES
from orchestration import load_config, run
from test_resume import assert_same_weights, finish, kill_busy, ray_processes, start, wait_for_step, weights

pytestmark = pytest.mark.slow
# Wall-clock metrics, and the weight loads replicas made (a judge call of a later chunk may reach a replica
# before the meta-judge call of an earlier one: one load more or less, never a different result).
TIMING = ("step_time", "_per_s", "calls", "latency_s", "latency_max_s", "refit_time_s", "pool_refit_wait_s",
          "refit_loads")
MAX_LAG = 1


def overrides(toy_cache, out, *extra, every=2):
    return ["algorithm=meta_rewarding", f"output_dir={out}", f"model.toy.cache_dir={toy_cache}",
            "logger.wandb.mode=disabled", *TOY_TEST_OVERRIDES, "algorithm.global_batch_size=8",
            "algorithm.micro_batch_size=4", "algorithm.meta_judge_pcnt=0.25", "algorithm.max_iterations=2",
            "algorithm.save_interval=2", "algorithm.rollout_batch_size=8", "algorithm.limit_train_batches=7",
            "algorithm.num_evals_to_average=2", "checkpoint.keep_last=1", f"algorithm.refit_every_steps={every}",
            f"algorithm.max_policy_lag={MAX_LAG}", "algorithm.max_prompts_ahead=24", *extra]


def metric_rows(out: Path, drop=()) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(TIMING) and k not in drop} for r in rows]


@pytest.fixture(scope="module")
def streaming_run(ray_session, toy_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("streaming")
    run(load_config(overrides(toy_cache, out, "cluster.health_check_interval_s=5")))
    return out


def test_versions_are_recorded_and_the_lag_stays_within_the_bound_with_a_slow_replica(streaming_run, toy_cache,
                                                                                      tmp_path):
    steps = [r for r in metric_rows(streaming_run) if "train/loss" in r]
    assert steps and all("train/weight_version" in r for r in steps)
    # The learner's version at each step: one more every 2 steps of an iteration, one more at each boundary.
    per_iteration = {}
    for r in steps:
        per_iteration.setdefault(r["train/iteration"], []).append(r["train/weight_version"])
    assert sorted(per_iteration) == [0, 1]
    for it, versions in per_iteration.items():
        assert versions == sorted(versions) and versions[-1] > versions[0], (it, versions)
        assert all(b - a <= 1 for a, b in zip(versions, versions[1:]))
    assert min(per_iteration[1]) > max(per_iteration[0])
    lags = [r["train/policy_lag_max"] for r in steps]
    assert max(lags) <= MAX_LAG and max(lags) > 0, lags  # the pools do lag, never beyond the bound

    # The same run with one of two generator replicas stopped again and again (a slow replica): the schedule
    # is decided from the data, so every number and every weight comes out the same.
    proc = start(overrides(toy_cache, tmp_path, "cluster.health_check_interval_s=60", "cluster.generators.replicas=2",
                       # two replicas in the test session's 4 CPUs (with the judge and 2 learner workers)
                       "cluster.generators.num_cpus=0.5"))
    stop = threading.Event()

    def slow_down():
        while not stop.is_set() and proc.poll() is None:
            pids = ray_processes("GeneratorActor")
            if len(pids) == 2:
                os.kill(pids[0], signal.SIGSTOP)
                time.sleep(1.5)
                os.kill(pids[0], signal.SIGCONT)
            time.sleep(0.5)

    slower = threading.Thread(target=slow_down, daemon=True)
    slower.start()
    try:
        code, log = finish(proc)
    finally:
        stop.set()
        slower.join()
    assert code == 0, log[-3000:]
    assert metric_rows(tmp_path) == metric_rows(streaming_run)
    assert_same_weights(weights(tmp_path), weights(streaming_run))


def test_pairs_beyond_the_lag_bound_are_dropped_and_counted(ray_session, toy_cache, tmp_path):
    # A refit after every step with 3 chunks of look-ahead: pairs 2 versions old come up (with a refit every
    # 2 steps, as above, the iterations are too short for that).
    run(load_config(overrides(toy_cache, tmp_path, every=1)))
    steps = [r for r in metric_rows(tmp_path) if "train/loss" in r]
    assert max(r["train/policy_lag_max"] for r in steps) == MAX_LAG
    assert sum(r["train/stale_pairs_dropped"] for r in steps) > 0
    iterations = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
                  if "iter/stale_pairs_dropped" in line]
    # the iteration's count also has the pairs dropped after its last step (they would have been left over)
    assert sum(r["iter/stale_pairs_dropped"] for r in iterations) >= sum(r["train/stale_pairs_dropped"] for r in steps)


def test_killed_mid_iteration_with_streaming_refits_resumes_bit_for_bit(streaming_run, toy_cache, tmp_path):
    args = overrides(toy_cache, tmp_path, "cluster.health_check_interval_s=5")
    # generation:6 comes after the first refit (chunks at version 1 are being submitted); step:5 and
    # checkpoint:2 after the step-2 and step-4 checkpoints, which store the versions still scheduled.
    for crash_at in ("generation:6", "step:5", "checkpoint:2"):
        code, log = finish(start(args, crash_at))
        assert code == -signal.SIGKILL, f"{crash_at}: exited {code} without reaching the crash point:\n{log[-3000:]}"
    code, log = finish(start(args))
    assert code == 0, log[-3000:]
    assert "resuming from" in log
    mids = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert mids and all((p / "streaming_weights").is_dir() for p in mids)
    assert metric_rows(tmp_path) == metric_rows(streaming_run)
    assert_same_weights(weights(tmp_path), weights(streaming_run))


def test_a_replica_restarted_between_refits_reissues_its_work_at_the_right_version(streaming_run, toy_cache,
                                                                                   tmp_path):
    proc = start(overrides(toy_cache, tmp_path, "cluster.health_check_interval_s=5"))
    wait_for_step(tmp_path, 3, proc)  # past the first refit: the replicas serve version 1 or 2 now
    kill_busy("GeneratorActor", proc)
    kill_busy("JudgeActor", proc)
    code, log = finish(proc)
    assert code == 0, log[-3000:]
    assert "generator replica 0 died" in log and "judge replica 0 died" in log
    # A call re-issued at another version would fail the version check (WrongWeightVersion) or change the pairs.
    assert metric_rows(tmp_path, drop=("train/actor_restarts",)) == \
        metric_rows(streaming_run, drop=("train/actor_restarts",))
    assert_same_weights(weights(tmp_path), weights(streaming_run))


def test_spin_streams_every_step(ray_session, toy_cache, tmp_path):
    out = tmp_path / "spin"
    run(load_config(["algorithm=spin", f"output_dir={out}", f"model.toy.cache_dir={toy_cache}",
                     "logger.wandb.mode=disabled", *TOY_TEST_OVERRIDES, "algorithm.global_batch_size=8",
                     "algorithm.micro_batch_size=4", "algorithm.limit_train_batches=4",
                     "algorithm.rollout_batch_size=8", "algorithm.max_prompts_ahead=16",
                     "algorithm.refit_every_steps=1", "algorithm.reference_update=initial"]))
    steps = [r for r in metric_rows(out) if "train/loss" in r]
    per_iteration = {}
    for r in steps:
        per_iteration.setdefault(r["train/iteration"], []).append(r["train/weight_version"])
    assert sorted(per_iteration) == [0, 1]
    for versions in per_iteration.values():  # a new version after every step of an iteration
        assert versions == list(range(versions[0], versions[0] + len(versions))), versions
    # the version published after iteration 0's last step, then the boundary's M_2
    assert per_iteration[1][0] == per_iteration[0][-1] + 2
    # two chunks of look-ahead: each chunk is one step's pairs, so the second is a version behind (with one
    # chunk ahead every chunk would wait for the version it trains at, and nothing would lag)
    assert max(r["train/policy_lag_max"] for r in steps) == 1
