"""The batch generation job: the same file whatever the number of replicas, exact resume after a kill,
a torn last line repaired, nothing dropped silently."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from conftest import TOY_TEST_OVERRIDES
from orchestration import load_config, run
from orchestration.config import ConfigError
from orchestration.resumable_output import ResumableJsonl

ROOT = Path(__file__).resolve().parent.parent


def test_torn_last_line_is_cut_and_complete_lines_counted(tmp_path):
    path = tmp_path / "out.jsonl"
    out = ResumableJsonl(path, {"seed": 1})
    assert out.open() == 0
    out.append([{"index": 0}, {"index": 1}])
    out.close()
    with path.open("ab") as f:
        f.write(b'{"index": 2, "resp')
    again = ResumableJsonl(path, {"seed": 1})
    assert again.open() == 2 and again.repaired_bytes == len(b'{"index": 2, "resp')
    assert again.last_record() == {"index": 1}
    again.close()
    assert path.read_bytes() == b'{"index": 0}\n{"index": 1}\n'


def test_other_settings_or_a_foreign_file_are_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    out = ResumableJsonl(path, {"seed": 1, "top_p": 0.9})
    out.open()
    out.close()
    with pytest.raises(ConfigError, match="top_p=0.9"):
        ResumableJsonl(path, {"seed": 1, "top_p": 0.5}).open()
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"a": 1}\n')
    with pytest.raises(ConfigError, match="not written by this job"):
        ResumableJsonl(foreign, {"seed": 1}).open()


def overrides(toy_cache, out, *extra):
    return ["algorithm=generate", f"output_dir={out}", f"model.toy.cache_dir={toy_cache}", *TOY_TEST_OVERRIDES,
            "algorithm.num_responses_to_gen=3", "algorithm.rollout_batch_size=4", *extra]


@pytest.fixture(scope="module")
def reference_output(ray_session, toy_cache, tmp_path_factory):
    """An uninterrupted run with one replica."""
    out = tmp_path_factory.mktemp("gen_ref")
    result = run(load_config(overrides(toy_cache, out)))
    return Path(result.generation["output_file"]), result


@pytest.mark.slow
def test_output_is_complete_and_in_input_order(reference_output):
    path, result = reference_output
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(96))
    assert all(len(x["responses"]) == 3 for x in lines)
    first = lines[0]
    assert first["prompt"][-1]["role"] == "user" and "answer" in first["metadata"]
    assert set(first["responses"][0]) == {"text", "ended", "tokens"}
    assert result.generation["responses"] == 3 * 96


@pytest.mark.slow
def test_two_replicas_write_the_same_file(reference_output, toy_cache, tmp_path):
    path, _ = reference_output
    result = run(load_config(overrides(toy_cache, tmp_path, "cluster.generators.replicas=2")))
    assert Path(result.generation["output_file"]).read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_unended_responses_are_flagged_or_left_out_and_counted(ray_session, toy_cache, tmp_path):
    kept = run(load_config(overrides(toy_cache, tmp_path / "kept", "algorithm.sampling.max_new_tokens=2")))
    lines = [json.loads(x) for x in Path(kept.generation["output_file"]).read_text().splitlines()]
    unended = sum(not r["ended"] for x in lines for r in x["responses"])
    assert unended == kept.generation["unended"] > 0 and len(lines) == 96
    dropped = run(load_config(overrides(toy_cache, tmp_path / "dropped", "algorithm.sampling.max_new_tokens=2",
                                        "generation.keep_unended=false")))
    lines = [json.loads(x) for x in Path(dropped.generation["output_file"]).read_text().splitlines()]
    assert len(lines) == 96 and all(r["ended"] for x in lines for r in x["responses"])
    assert dropped.generation["dropped_unended"] == unended


@pytest.mark.slow
def test_a_torn_last_line_is_rewritten(reference_output, toy_cache, tmp_path):
    path, _ = reference_output
    mine = tmp_path / "generations.jsonl"
    full = path.read_bytes()
    cut = full.rindex(b"\n", 0, len(full) - 1) + 1 + 25  # 25 bytes into the last line
    mine.write_bytes(full[:cut])
    (tmp_path / "generations.jsonl.settings.json").write_bytes(
        path.with_name(path.name + ".settings.json").read_bytes())
    result = run(load_config(overrides(toy_cache, tmp_path)))
    assert result.generation["repaired_bytes"] == 25 and result.generation["generated_prompts"] == 1
    assert mine.read_bytes() == full


@pytest.mark.slow
def test_killed_job_resumes_to_the_uninterrupted_output(reference_output, toy_cache, tmp_path):
    path, _ = reference_output
    mine = tmp_path / "generations.jsonl"
    address = ray.get_runtime_context().gcs_address
    # Slots for 2 sequences at a time: slow enough to be stopped part-way.
    args = overrides(toy_cache, tmp_path, f"cluster.address={address}", "cluster.generators.max_batch_size=2")
    cmd = [sys.executable, "-m", "orchestration.main", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if mine.exists() and mine.read_bytes().count(b"\n") >= 8:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the job ended before it could be stopped: {proc.stderr.read()[-2000:]!r}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    written = mine.read_bytes().count(b"\n")
    assert 8 <= written < 96
    result = run(load_config(overrides(toy_cache, tmp_path, "cluster.generators.max_batch_size=2")))
    assert result.generation["resumed_at"] == written
    assert mine.read_bytes() == path.read_bytes()
