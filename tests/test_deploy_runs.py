"""The ways users run it: `ray job submit --working-dir` against a running Ray head, and the Python driver
example. The head is started here on 127.0.0.1 (token auth on, as Ray 2.60 does by default) and stopped by
its process group, never by a blanket `ray stop`."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TOY_TEST_OVERRIDES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
RAY_CLI = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]
SHORT_RUN = ["algorithm.max_iterations=1", "algorithm.limit_train_batches=4", "algorithm.global_batch_size=4",
             "algorithm.micro_batch_size=2", "algorithm.save_interval=1", "logger.wandb.mode=offline"]


def free_port() -> int:
    """A free loopback port outside Ray's default worker ports (10002-19999), which `ray start` refuses to
    give to another component."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


@pytest.fixture(scope="module")
def toy_ready(toy_cache):
    """Build the session's toy world before a job needs it (a job should not spend minutes bootstrapping)."""
    from orchestration import load_config
    from orchestration.driver import _resolve_model

    _resolve_model(load_config([f"model.toy.cache_dir={toy_cache}", *TOY_TEST_OVERRIDES]), print)
    return toy_cache


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on loopback with the job API, in its own process group; yields the dashboard address."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    dashboard = free_port()
    head = subprocess.Popen(
        [*RAY_CLI, "start", "--head", "--block", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
         "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the job API answers once the dashboard is up
            probe = subprocess.run([*RAY_CLI, "job", "list", "--address", address], env=env, capture_output=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(2)
        yield address, env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the head and everything it started: its process group
            try:
                os.killpg(head.pid, sig)
                head.wait(60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_toy_self_rewarding(ray_head, toy_ready, tmp_path):
    address, env = ray_head
    out = tmp_path / "run"
    entry = [sys.executable, "-m", "orchestration.main", "cluster.address=auto", f"output_dir={out}",
             f"model.toy.cache_dir={toy_ready}", *TOY_TEST_OVERRIDES, *SHORT_RUN]
    runtime_env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "WANDB_SILENT": "true"}}
    deadline = time.monotonic() + 300
    while True:
        submit = subprocess.run(
            [*RAY_CLI, "job", "submit", "--address", address, "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps(runtime_env), "--", *entry],
            env=env, capture_output=True, text=True, timeout=900)
        log = submit.stdout + submit.stderr
        # The job API answers before the head's dashboard agent has registered (slow on a loaded machine);
        # until then Ray refuses submissions with "No available agent ... try again later". On a loaded machine
        # the job's supervisor actor can also die before the job starts ("The actor never ran"): nothing ran,
        # so submitting again is safe.
        not_started = "No available agent" in log or "The actor never ran" in log
        if submit.returncode == 0 or not not_started or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert submit.returncode == 0, log[-4000:]
    job_id = next(w.strip("'") for line in log.splitlines() if "submitted successfully" in line
                  for w in line.split() if w.strip("'").startswith("raysubmit_"))
    status = subprocess.run([*RAY_CLI, "job", "status", "--address", address, job_id], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()  # "Job ... succeeded" (status SUCCEEDED)
    assert "[run] finished" in log
    assert (out / "checkpoints" / "iter_0" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "step_1" / "run_state.json").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps and steps == list(range(1, len(steps) + 1))


def test_python_driver_example_runs_the_toy_world(ray_session, toy_ready, tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import python_driver
    finally:
        sys.path.pop(0)
    result = python_driver.main([f"output_dir={tmp_path}", f"model.toy.cache_dir={toy_ready}", *TOY_TEST_OVERRIDES,
                                 "algorithm.limit_train_batches=4", "algorithm.global_batch_size=4",
                                 "algorithm.micro_batch_size=2"])
    assert result.stopped is None
    assert [r["iteration"] for r in result.iterations] == [0, 1]  # iteration 0 and the final model
    assert result.checkpoints == [tmp_path / "checkpoints" / "iter_0"]
    assert "save_interval: 4" in (tmp_path / "config.yaml").read_text()  # set in Python by the example
    assert result.metrics_file.is_file()
