"""A foreseeable failure in the pools reaches the user as one RunFailed message (exit code 1) that says where
the run resumes from, never as a raw traceback."""

import json

import pytest

from orchestration import RunFailed, load_config, run
from orchestration import driver
from orchestration.errors import LearnerFailed, RefitFailed, ReplicaFailed, WrongWeightVersion
from orchestration.main import main


@pytest.fixture
def hf_run(tiny_llama, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"t{i} t{i + 1}"},
                                                     {"role": "assistant", "content": "t3"}]}) + "\n"
                            for i in range(2, 10)))
    return ["model=hf", f"model.path={tiny_llama}", f"data.train_file={data}", f"output_dir={tmp_path / 'out'}",
            "data.chat_template=nemo", "logger.wandb.mode=disabled", "cluster.learner.workers=1"]


@pytest.mark.parametrize("failure", [ReplicaFailed("judge replica 0 failed 4 times"),
                                     LearnerFailed("learner worker 1 died"),
                                     RefitFailed("refit of judge replica 0 to version 1 failed: it reports 0"),
                                     WrongWeightVersion("prompt 3 was served by weight versions [0, 1]")])
def test_pool_failures_become_one_run_failed_message(failure, hf_run, ray_session, monkeypatch, capsys):
    def start_pools(*args, **kwargs):
        raise failure

    monkeypatch.setattr(driver, "start_pools", start_pools)
    with pytest.raises(RunFailed, match=r"the run stopped: .*no checkpoint was completed yet; run the same command "
                                        r"again to resume from the start"):
        run(load_config(hf_run))
    assert main(hf_run) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the run stopped: " + str(failure)) and "Traceback" not in err


def test_a_replica_out_of_memory_names_the_pool_and_the_settings_to_change():
    from orchestration.cluster import EnginePool

    judges = EnginePool("judge", [None], max_restarts=0)
    oom = RuntimeError("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    failure = judges.call_failed(0, "judge", oom)
    assert isinstance(failure, ReplicaFailed)
    text = str(failure)
    assert text.startswith("judge replica 0 failed in judge (RuntimeError: torch.OutOfMemoryError: CUDA out of memory")
    assert "engine.kv_cache_memory_gb" in text and "cluster.judges.max_batch_size" in text
    assert "memory" not in str(judges.call_failed(0, "judge", ValueError("bad token id")))
    with pytest.raises(ReplicaFailed, match=r"generator replica 0 failed 1 times.*it ran out of memory.*"
                                            r"cluster.generators.max_batch_size"):
        EnginePool("generator", [None], max_restarts=0, log=lambda _: None).note_restart(
            0, "Worker killed due to memory pressure (OOM)", "re-issuing its work")


def test_asking_ray_whether_a_replica_restarted_prints_no_deprecation_lines():
    """Ray's was_current_actor_reconstructed reads its own deprecated actor_id: three lines per replica."""
    import warnings

    from actors.engine_host import _was_restarted

    class Context:
        @property
        def was_current_actor_reconstructed(self):
            warnings.warn("Use get_actor_id() instead", DeprecationWarning)
            return True

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _was_restarted(Context()) is True
    assert not seen
