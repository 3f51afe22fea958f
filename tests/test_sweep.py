"""The seed sweep (orchestration.sweep): argument checks, aggregation over seeds, outputs, resuming, failures
and signals with stand-in runs, and one real sweep of the toy world."""

import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import TOY_TEST_OVERRIDES
from orchestration.errors import ConfigError
from orchestration.sweep import SweepArgs, aggregate, main, parse_args
from orchestration.sweep.job import sweep
from orchestration.sweep.report import plot
from orchestration.sweep.runs import Executor, Run, RunBusy, launch, load_finished, plan, run_dir

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(iteration, steps, **figures):
    return {"iteration": iteration, "steps": steps, **figures}


# Two finished self_rewarding seeds (seed 2 lacks some figures), seed 3 interrupted; meta_rewarding seed 1 only.
RUNS = {
    ("self_rewarding", 1): [row(0, 10, task_accuracy=0.50, heldout_judge_accuracy=0.70, judge_accuracy=0.60,
                                pairs_trained=100),
                            row(1, 8, task_accuracy=0.60, heldout_judge_accuracy=0.72, pairs_trained=80),
                            row(2, 0, task_accuracy=0.62, heldout_judge_accuracy=0.75, pairs_trained=0)],
    ("self_rewarding", 2): [row(0, 5, task_accuracy=0.40, heldout_judge_accuracy=0.60, pairs_trained=50),
                            row(1, 5, task_accuracy=0.44, heldout_judge_accuracy=None, pairs_trained=60),
                            row(2, 0, task_accuracy=0.50, heldout_judge_accuracy=0.58, pairs_trained=0)],
    ("meta_rewarding", 1): [row(0, 10, task_accuracy=0.50, heldout_judge_accuracy=0.70, judge_pairs=3),
                            row(1, 0, task_accuracy=0.55, heldout_judge_accuracy=0.80)],
}
SECONDS = {("self_rewarding", 1): 30.0, ("self_rewarding", 2): 40.0, ("meta_rewarding", 1): 50.0}
ALGORITHMS, SEEDS = ("self_rewarding", "meta_rewarding"), (1, 2, 3)


def write_runs(out: Path) -> list:
    for (algorithm, seed), rows in RUNS.items():
        d = run_dir(out, algorithm, seed)
        d.mkdir(parents=True)
        (d / "run_complete.json").write_text(json.dumps({"iterations": rows, "seconds": SECONDS[(algorithm, seed)]}))
    unfinished = run_dir(out, "self_rewarding", 3)
    unfinished.mkdir(parents=True)
    (unfinished / "metrics.jsonl").write_text("{}\n")
    return plan(ALGORITHMS, SEEDS, out, [])


def test_aggregate_means_stds_and_gains_by_hand(tmp_path):
    runs = write_runs(tmp_path)
    finished = load_finished(runs)
    assert set(finished) == set(RUNS)  # the interrupted run is left out
    result = aggregate(finished, ALGORITHMS, SEEDS)
    sr = result["algorithms"]["self_rewarding"]
    assert sr["seeds"] == [1, 2]
    assert [r["label"] for r in sr["rows"]] == ["0", "1", "final"]
    first, middle, final = sr["rows"]
    assert first["n"] == 2
    task0 = first["metrics"]["task_accuracy"]
    assert task0["mean"] == pytest.approx(0.45) and task0["std"] == pytest.approx(math.sqrt(2 * 0.05**2))
    assert task0["n"] == 2 and task0["values"] == {1: 0.50, 2: 0.40}
    # A missing figure (None) leaves only the seeds that have it; one seed has std 0.
    assert middle["metrics"]["heldout_judge_accuracy"] == {"mean": 0.72, "std": 0.0, "n": 1, "values": {1: 0.72}}
    assert first["metrics"]["judge_accuracy"]["n"] == 1
    assert "top_score_share" not in first["metrics"] and "judge_pairs" not in first["metrics"]
    assert final["metrics"]["task_accuracy"]["mean"] == pytest.approx(0.56)
    assert final["metrics"]["task_accuracy"]["std"] == pytest.approx(math.sqrt(2 * 0.06**2))
    assert final["metrics"]["pairs_trained"]["mean"] == 0
    gains = sr["gains"]
    assert gains["per_seed"][1]["task_accuracy"] == pytest.approx(0.12)
    assert gains["per_seed"][2]["heldout_judge_accuracy"] == pytest.approx(-0.02)
    task = gains["summary"]["task_accuracy"]
    assert task["mean"] == pytest.approx(0.11) and task["std"] == pytest.approx(math.sqrt(2 * 0.01**2))
    assert (task["n"], task["n_at_least_threshold"]) == (2, 2)
    assert task["min"] == pytest.approx(0.10) and task["max"] == pytest.approx(0.12)
    judge = gains["summary"]["heldout_judge_accuracy"]
    assert judge["n_at_least_threshold"] == 1  # 0.75 - 0.70 counts as the 5-point gain it is
    assert judge["mean"] == pytest.approx(0.015)
    assert sr["seconds"] == {1: 30.0, 2: 40.0}
    mr = result["algorithms"]["meta_rewarding"]
    assert mr["seeds"] == [1] and [r["label"] for r in mr["rows"]] == ["0", "final"]
    assert mr["gains"]["summary"]["task_accuracy"]["std"] == 0.0
    diff = result["meta_vs_self"]["heldout_judge_accuracy"]
    assert diff["per_seed"] == {1: pytest.approx(0.05)} and diff["n"] == 1 and diff["std"] == 0.0


def test_rows_without_a_final_model_and_a_shorter_run():
    finished = {("spin", 1): {"iterations": [row(0, 4, task_accuracy=None)], "seconds": 1},
                ("spin", 2): {"iterations": [row(0, 4, task_accuracy=0.3), row(1, 4, task_accuracy=0.4),
                                             row(2, 0, task_accuracy=0.5)], "seconds": 1}}
    spin = aggregate(finished, ["spin"], [1, 2])["algorithms"]["spin"]
    assert [(r["label"], r["n"]) for r in spin["rows"]] == [("0", 2), ("1", 1), ("final", 1)]
    assert spin["gains"]["per_seed"][1]["task_accuracy"] is None  # no final row: no gain
    assert spin["gains"]["summary"]["task_accuracy"]["n"] == 1
    assert aggregate(finished, ["spin"], [1, 2])["meta_vs_self"] is None


def test_all_complete_starts_no_run_and_writes_the_outputs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    for algorithm, seed in [(a, s) for s in (1, 2) for a in ALGORITHMS]:
        d = run_dir(out, algorithm, seed)
        d.mkdir(parents=True)
        rows = RUNS.get((algorithm, seed), RUNS[("self_rewarding", 2)])
        (d / "run_complete.json").write_text(json.dumps({"iterations": rows, "seconds": 5.0}))

    def no_launch(run, env):
        raise AssertionError(f"started {run.name}")

    monkeypatch.setattr("orchestration.sweep.runs.launch", no_launch)
    args = SweepArgs(seeds=(1, 2), output_dir=out)
    assert sweep(args, "python -m orchestration.sweep seeds=2") == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["command"] == "python -m orchestration.sweep seeds=2" and doc["unfinished"] == []
    assert [r["status"] for r in doc["runs"]] == ["complete"] * 4
    assert doc["runs"][0]["command"][-4:] == ["orchestration.main", "algorithm=self_rewarding", "seed=1",
                                              f"output_dir={run_dir(out, 'self_rewarding', 1)}"]
    assert doc["algorithms"]["meta_rewarding"]["rows"][-1]["n"] == 2
    md = (out / "sweep.md").read_text()
    assert "python -m orchestration.sweep seeds=2" in md and "± " in md and "| final |" in md
    assert "meta_rewarding - self_rewarding" in md
    assert md.strip() in capsys.readouterr().out


def test_a_rerun_with_other_overrides_into_the_same_output_dir_is_refused(tmp_path, capsys):
    """A finished run made with other overrides must not be reported under the new command."""
    out, started = tmp_path / "sweep", []
    first = plan(("self_rewarding",), (1,), out, ["model.toy.bootstrap_steps=900"])
    ex = Executor(first, parallel=1, log=lambda _: None, launcher=fake_launcher({first[0].name: "ok"}, started))
    assert [o.status for o in ex.execute()] == ["complete"]
    code = main(["seeds=1", "algorithms=[self_rewarding]", f"output_dir={out}", "model.toy.bootstrap_steps=1500"])
    err = capsys.readouterr().err
    assert code == 2 and "started with other arguments" in err
    assert "model.toy.bootstrap_steps=900" in err and "model.toy.bootstrap_steps=1500" in err
    assert not (out / "sweep.json").exists()
    # the same overrides again: the finished run counts, nothing starts
    assert main(["seeds=1", "algorithms=[self_rewarding]", f"output_dir={out}", "model.toy.bootstrap_steps=900"]) == 0
    assert started == ["self_rewarding seed 1"] and (out / "sweep.json").exists()


def test_png_is_written(tmp_path):
    finished = load_finished(write_runs(tmp_path))
    for name, data in (("runs.png", finished), ("empty.png", {})):
        plot(data, ALGORITHMS, tmp_path / name)
        content = (tmp_path / name).read_bytes()
        assert content[:8] == PNG_MAGIC and len(content) > 1000


def fake_launcher(behaviour, started):
    """Start a stand-in for each run: 'ok' writes the completion marker, 'fail' exits 3, 'sleep' waits for a
    signal and records it."""
    scripts = {
        "ok": "import json,sys; open(sys.argv[1] + '/run_complete.json', 'w').write(json.dumps("
              "{'iterations': [{'iteration': 0, 'steps': 1, 'task_accuracy': 0.5}, "
              "{'iteration': 1, 'steps': 0, 'task_accuracy': 0.6}], 'seconds': 1.0}))",
        "fail": "print('loading the model'); print('error: the model is broken'); raise SystemExit(3)",
        "sleep": "import signal,sys,time\n"
                 "def stop(n, f):\n    open(sys.argv[1] + '/signal', 'w').write(signal.Signals(n).name); sys.exit(0)\n"
                 "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(60)",
    }

    def launch(run, env):
        started.append(run.name)
        run.directory.mkdir(parents=True, exist_ok=True)
        with open(run.log, "a") as log:
            return subprocess.Popen([sys.executable, "-c", scripts[behaviour[run.name]], str(run.directory)],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    return launch


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path):
    out, started, lines = tmp_path / "sweep", [], []
    behaviour = {"self_rewarding seed 1": "fail", "self_rewarding seed 2": "ok"}
    args = SweepArgs(seeds=(1, 2), algorithms=("self_rewarding",), output_dir=out, parallel=2)
    assert sweep(args, "cmd", log=lines.append, launcher=fake_launcher(behaviour, started)) == 1
    assert sorted(started) == sorted(behaviour)
    text = "\n".join(lines)
    assert "failed with exit code 3" in text and "error: the model is broken" in text
    assert str(run_dir(out, "self_rewarding", 1) / "sweep.log") in text
    assert "1 of 2 runs done" in text
    doc = json.loads((out / "sweep.json").read_text())
    assert [(r["seed"], r["status"], r["exit_code"]) for r in doc["runs"]] == [(1, "failed", 3), (2, "complete", 0)]
    assert doc["unfinished"][0]["seed"] == 1
    assert doc["algorithms"]["self_rewarding"]["rows"][0]["n"] == 1
    assert doc["runs"][1]["wall_seconds"] > 0


def test_one_seed_runs_one_at_a_time(tmp_path):
    """Two runs of one seed would both build its toy world: with parallel=2 they still take turns."""
    started = []
    runs = plan(ALGORITHMS, (1,), tmp_path, [])
    ex = Executor(runs, parallel=2, log=lambda _: None,
                  launcher=fake_launcher({r.name: "ok" for r in runs}, started))
    assert [o.status for o in ex.execute()] == ["complete", "complete"]
    assert started == ["self_rewarding seed 1", "meta_rewarding seed 1"]


def test_sigterm_is_passed_on_and_no_new_run_starts(tmp_path):
    out, started, lines = tmp_path / "sweep", [], []
    behaviour = {"self_rewarding seed 1": "sleep", "self_rewarding seed 2": "ok"}
    args = SweepArgs(seeds=(1, 2), algorithms=("self_rewarding",), output_dir=out)
    first_log = run_dir(out, "self_rewarding", 1) / "sweep.log"

    def terminate_when_ready():
        for _ in range(200):
            if first_log.exists() and "ready" in first_log.read_text():
                break
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_ready, daemon=True).start()
    code = sweep(args, "cmd", log=lines.append, launcher=fake_launcher(behaviour, started))
    assert code == 128 + signal.SIGTERM
    assert started == ["self_rewarding seed 1"]
    assert (run_dir(out, "self_rewarding", 1) / "signal").read_text() == "SIGTERM"
    doc = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in doc["runs"]] == ["interrupted", "not started"]
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_a_run_still_going_from_an_earlier_sweep_is_not_started_twice(tmp_path):
    """The run's process holds its directory's lock (a sweep killed outright leaves its runs going)."""
    run = Run("self_rewarding", 1, tmp_path / "run", (sys.executable, "-c", "import time; time.sleep(1.5)"))
    first = launch(run, os.environ)
    with pytest.raises(RunBusy, match="still in use"):
        launch(run, os.environ)
    lines = []
    outcomes = Executor([run], parallel=1, log=lines.append).execute()
    assert [o.status for o in outcomes] == ["busy"] and "not started" in "\n".join(lines)
    assert first.wait(timeout=30) == 0
    launch(run, os.environ).wait(timeout=30)  # free again once the run has ended


def test_arguments_and_defaults():
    args = parse_args([])
    assert args.seeds == (1, 2, 3) and args.algorithms == ("self_rewarding", "meta_rewarding")
    assert args.output_dir == Path("outputs/sweep") and args.parallel == 1 and args.overrides == ()
    args = parse_args(["seeds=[3,7,9]", "algorithms=meta_rewarding", "algorithm.max_iterations=3", "output_dir=o",
                       "parallel=2", "model.toy.bootstrap_steps=300"])
    assert args.seeds == (3, 7, 9) and args.algorithms == ("meta_rewarding",)
    assert args.output_dir == Path("o") and args.parallel == 2
    assert args.overrides == ("algorithm.max_iterations=3", "model.toy.bootstrap_steps=300")
    assert parse_args(["seeds=5"]).seeds == (1, 2, 3, 4, 5)


@pytest.mark.parametrize("arg, named", [
    ("seeds=0", "seeds=0"), ("seeds=-2", "seeds=-2"), ("seeds=[1,0]", "got 0"), ("seeds=[2,2]", "repeats"),
    ("seeds=abc", "'abc'"), ("seeds=[1,", "'seeds=[1,'"), ("algorithms=[self_rewarding,dpo]", "'dpo'"),
    ("algorithms=generate", "'generate'"), ("parallel=0", "parallel=0"), ("seed=3", "seeds="),
    ("algorithm=spin", "algorithms="), ("nonsense", "'nonsense'"), ("--cfg", "'--cfg'"),
])
def test_bad_arguments_name_the_value(arg, named, capsys):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        parse_args([arg])
    assert main([arg]) == 2
    assert named in capsys.readouterr().err


def test_a_bad_run_override_fails_before_any_run(tmp_path, capsys):
    assert main([f"output_dir={tmp_path}", "algorithm.num_responses=4"]) == 2
    assert "unknown configuration key 'algorithm.num_responses'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "seeds=N" in capsys.readouterr().out


@pytest.mark.slow
def test_sweep_of_two_toy_seeds(toy_cache, tmp_path):
    """The real command: two seeds of Self-Rewarding on a tiny toy world, both at once (two local Ray
    clusters), then a rerun that finds everything done."""
    out = tmp_path / "sweep"
    tiny = [*TOY_TEST_OVERRIDES, "model.toy.bootstrap_steps=30", "model.toy.meta_judgements=0",
            "model.toy.answer_steps=20",
            "algorithm.max_iterations=1", "algorithm.limit_train_batches=2", "algorithm.global_batch_size=8",
            "algorithm.micro_batch_size=4", "logger.wandb.mode=disabled"]
    cmd = [sys.executable, "-m", "orchestration.sweep", "seeds=2", "algorithms=self_rewarding", f"output_dir={out}",
           "parallel=2", f"model.toy.cache_dir={toy_cache}", *tiny]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 of 2 runs done" in proc.stdout
    doc = json.loads((out / "sweep.json").read_text())
    rows = doc["algorithms"]["self_rewarding"]["rows"]
    assert [r["label"] for r in rows] == ["0", "final"] and all(r["n"] == 2 for r in rows)
    assert rows[-1]["metrics"]["task_accuracy"]["n"] == 2
    assert "| final | 2 |" in (out / "sweep.md").read_text()
    assert (out / "sweep_accuracy.png").read_bytes()[:8] == PNG_MAGIC
    for seed in (1, 2):  # the runs' directory locks ended with them (nothing they started kept one)
        lock = os.open(run_dir(out, "self_rewarding", seed) / ".sweep.lock", os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(lock)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 of 2 runs already complete" in again.stdout
    assert "start self_rewarding" not in again.stdout
