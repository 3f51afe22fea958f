"""judge.backend=triton against a real Triton server: `python -m actors.serve_judge` serving the toy world's
frozen M1 on 127.0.0.1, started in a subprocess and stopped by its process id.

- Round trip: the remote judge's judgements (texts, scores, meta-judge verdicts) equal the same judge run
  locally with the same seeds, over HTTP and gRPC.
- A toy Self-Rewarding run whose judge is the frozen M1 behind the server completes (two iterations: the
  boundary refit leaves the remote judge alone), with the remote judge's metrics.
- Fault: the server killed mid-iteration makes the run retry, then stop with a message naming the URL and
  a checkpoint; with the server back, the same command resumes and ends with the weights of the
  uninterrupted run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from safetensors.torch import load_file

from actors.engines import EngineSpec
from actors.judge import JudgeActor
from actors.judges.protocol import FIXED, JudgeItem, JudgeSpec, MetaItem
from actors.judges.triton import TritonJudgeActor, TritonSpec
from conftest import TOY_TEST_OVERRIDES
from orchestration import driver, judge_templates, load_config, run
from orchestration.config import ConfigError, sampling_params

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TOY_CONTEXT = 256  # the judge context of these tests, server and local alike (the toy model takes up to 384)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class JudgeServer:
    """`python -m actors.serve_judge` in its own session (its process group holds Triton's processes)."""

    def __init__(self, model_dir: str, log: Path, ports: list[int] | None = None):
        self.http, self.grpc, self.metrics = ports or free_ports(3)
        self.model_dir, self.log = model_dir, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "JudgeServer":
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("LD_LIBRARY_PATH", None)  # serve_judge puts libpython's directory there itself
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actors.serve_judge", f"model.path={self.model_dir}", "host=127.0.0.1",
             f"port={self.http}", f"grpc_port={self.grpc}", f"metrics_port={self.metrics}",
             f"model.max_seq_len={TOY_CONTEXT}", "max_batch_size=64", "device=cpu", "exit_timeout_s=1"],
            cwd=ROOT, env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        import tritonclient.http as http

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve_judge exited {self.proc.returncode}:\n{self.tail()}"
            try:
                client = http.InferenceServerClient(f"127.0.0.1:{self.http}")
                ready = client.is_model_ready("judge") and client.is_model_ready("judge_info")
                client.close()
                if ready:
                    return self
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.5)
        raise AssertionError(f"serve_judge not ready within {timeout}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def kill(self) -> None:
        """SIGKILL the server's process group (the server and the Triton processes it started)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._clean()

    def stop(self) -> None:
        """SIGTERM (a clean stop), then SIGKILL for whatever of the group outlived it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._clean()

    def _clean(self) -> None:
        """PyTriton's shared-memory regions of this server (named after its process id), left by a kill."""
        for region in Path("/dev/shm").glob(f"pytrtion{self.proc.pid}-*"):
            region.unlink(missing_ok=True)


def toy_args(toy_cache, out, *extra) -> list[str]:
    """A short toy Self-Rewarding run: 2 iterations over the 96 prompts, a checkpoint every 2 steps."""
    return [f"output_dir={out}", f"model.toy.cache_dir={toy_cache}", "logger.wandb.mode=disabled",
            *TOY_TEST_OVERRIDES, "algorithm.global_batch_size=8", "algorithm.micro_batch_size=4",
            "algorithm.max_iterations=2", "algorithm.save_interval=2", "algorithm.rollout_batch_size=8",
            "algorithm.num_evals_to_average=2",
            "cluster.health_check_interval_s=5", *extra]


def remote_judge(server: JudgeServer) -> list[str]:
    return ["judge.backend=triton", f"judge.triton.url=127.0.0.1:{server.http}", "judge.triton.retries=2",
            "judge.triton.retry_backoff_s=0.2", "judge.triton.timeout_s=60"]


@pytest.fixture(scope="module")
def m1(toy_cache) -> str:
    """The toy world's M1 (the frozen judge), built once per session in the shared toy cache."""
    cfg = load_config([f"model.toy.cache_dir={toy_cache}", *TOY_TEST_OVERRIDES])
    return str(driver._resolve_model(cfg, print)[0])


@pytest.fixture(scope="module")
def server(m1, tmp_path_factory):
    s = JudgeServer(m1, tmp_path_factory.mktemp("serve_judge") / "server.log")
    try:
        yield s.start()
    finally:
        s.stop()


def toy_judge_spec() -> JudgeSpec:
    cfg = load_config(TOY_TEST_OVERRIDES)
    j = cfg.judge
    return JudgeSpec(template=judge_templates.resolve("judge.template", j.template),
                     meta_template=judge_templates.resolve("judge.meta_template", j.meta_template),
                     meta_max_new_tokens=j.meta_max_new_tokens, reward_regex=j.reward_regex,
                     sampling=sampling_params(j.sampling.resolve(cfg.algorithm.sampling)), follows_policy=False)


ITEMS = [JudgeItem(q, a, (11, 12, 13)) for q, a in (("What is 12 + 7?", "19"), ("Add 30 and 4.", "43"),
                                                    ("Compute 8 + 9.", "The answer is 17."), ("5 + 44 = ?", "49"))]


@pytest.mark.parametrize("protocol, port", [("http", "http"), ("grpc", "grpc")])
def test_the_remote_judge_scores_as_the_same_judge_run_locally(server, m1, protocol, port, single_thread):
    spec = toy_judge_spec()
    local = JudgeActor(EngineSpec(m1, max_batch_size=64, max_seq_len=TOY_CONTEXT), spec)
    remote = TritonJudgeActor(spec, TritonSpec(url=f"127.0.0.1:{getattr(server, port)}", protocol=protocol))
    try:
        here, there = local.judge(ITEMS), remote.judge(ITEMS)
        assert [j.texts for j in there.judgements] == [j.texts for j in here.judgements]
        assert [j.scores for j in there.judgements] == [j.scores for j in here.judgements]
        assert [j.token_ids for j in there.judgements] == [j.token_ids for j in here.judgements]
        assert sum(s is not None for j in there.judgements for s in j.scores) >= 6  # M1 does score
        assert {j.weight_version for j in there.judgements} == {FIXED}
        assert there.generated_tokens == here.generated_tokens
        stats = there.backend_stats
        assert stats["remote_requests"] >= 1 and stats["remote_retries"] == 0 and stats["remote_latency_s"] > 0
        # The meta-judge runs on the remote model too.
        a, b = here.judgements[0].texts[:2]
        meta = [MetaItem(ITEMS[0].prompt, ITEMS[0].response, a, b, seed=5),
                MetaItem(ITEMS[0].prompt, ITEMS[0].response, b, a, seed=6)]
        assert remote.meta_judge(meta).texts == local.meta_judge(meta).texts
        assert remote.memory_plan().startswith(f"remote judge at {protocol}://127.0.0.1:")
    finally:
        remote.engine.close()


@pytest.fixture(scope="module")
def remote_run(ray_session, server, toy_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_run")
    result = run(load_config(toy_args(toy_cache, out, *remote_judge(server))))
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    return out, result, rows


def test_a_self_rewarding_run_judged_by_frozen_m1_behind_the_server_completes(remote_run):
    out, result, rows = remote_run
    assert [c.name for c in result.checkpoints] == ["iter_0", "iter_1"]  # across a refit: the judge is left alone
    steps = [r for r in rows if "train/loss" in r]
    assert {r["train/iteration"] for r in steps} == {0, 1}
    assert all(r["train/judge/triton/requests"] >= 1 and r["train/judge/triton/failures"] == 0 for r in steps)
    assert all(r["train/judge/triton/request_latency_s"] > 0 for r in steps)
    assert min(r["train/judge_parse_rate"] for r in steps) > 0.5
    # Only a judge that follows the policy is scored on the held-out judge probes.
    assert all(row.get("heldout_judge_accuracy") is None for row in result.iterations)


def test_a_fixed_judge_model_in_its_own_pool_judges_exactly_as_the_remote_one(remote_run, m1, toy_cache, tmp_path):
    """judge.backend=model with M1 frozen: the same judgements as M1 behind the server, in both iterations (a
    judge pool refit at the boundary would judge iteration 1 with the trained weights instead)."""
    triton_out, _, triton_rows = remote_run
    result = run(load_config(toy_args(toy_cache, tmp_path, "judge.backend=model", f"judge.model.path={m1}")))
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    remote = ("requests", "retries", "timeouts", "unavailable", "malformed", "failures", "failed_requests")

    def strip(rs, backend):  # wall-clock metrics and the remote judge's transport counters left out
        return [{k.replace(f"judge/{backend}/", "judge/<backend>/"): v for k, v in r.items()
                 if not any(t in k for t in ("step_time", "_per_s", "latency"))
                 and not any(k.endswith(f"judge/{backend}/{m}") for m in remote)} for r in rs]

    assert strip(rows, "model") == strip(triton_rows, "triton")
    assert not any(k.endswith(f"judge/model/{m}") for r in rows for k in r for m in remote)  # a local judge
    mine, theirs = (load_file(str(o / "checkpoints" / "iter_1" / "model.safetensors")) for o in (tmp_path, triton_out))
    assert all((mine[k] == theirs[k]).all() for k in mine)


def test_a_dead_server_stops_the_run_naming_the_url_and_the_run_resumes(remote_run, m1, toy_cache, tmp_path):
    ref_out = remote_run[0]
    server = JudgeServer(m1, tmp_path / "server.log").start()
    out = tmp_path / "run"
    args = toy_args(toy_cache, out, *remote_judge(server), "algorithm.max_prompts_ahead=16")
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "orchestration.main", *args, f"cluster.address={address}"]
    try:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() or "train/loss" not in (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        server.kill()  # mid-iteration: the first step is done, later prompts still to judge
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 1, log[-3000:]
        url = f"http://127.0.0.1:{server.http}"
        assert f"the remote judge at {url}" in log and "failed 3 times" in log, log[-3000:]
        assert "run the same command again to resume" in log
        server.start()  # the same address again
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:]
        assert "resuming from" in done.stdout
    finally:
        server.stop()
    # Nothing lost: the prompts in flight were judged again with the same seeds.
    mine, ref = (load_file(str(o / "checkpoints" / "iter_1" / "model.safetensors")) for o in (out, ref_out))
    assert mine.keys() == ref.keys() and all((mine[k] == ref[k]).all() for k in mine)


def test_meta_rewarding_refuses_a_fixed_judge_with_another_vocabulary(ray_session, m1, toy_cache, tiny_llama, tmp_path):
    """Judge pairs are the judge's tokens trained into the policy: a judge with another vocabulary would
    teach it noise, so the run stops at start-up, naming the judge."""
    cfg = load_config(toy_args(toy_cache, tmp_path, "algorithm=meta_rewarding", "judge.backend=model",
                               f"judge.model.path={tiny_llama}", "judge.model.max_seq_len=64"))
    with pytest.raises(ConfigError, match=rf"the judge at {tiny_llama} \(judge.backend=model\) has another "
                                          "vocabulary than the policy"):
        run(cfg)
