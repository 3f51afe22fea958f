"""Start-up errors through the command line: one clear message, exit code 2, before any model is built."""

import json

import pytest

from orchestration.config import ConfigError, load_config
from orchestration.main import main


def test_broken_jsonl_line_stops_with_file_and_line(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    data.write_text(good + "\n" + good + "\n{not json\n")
    code = main([f"data.train_file={data}", f"output_dir={tmp_path / 'out'}",
                 f"model.toy.cache_dir={tmp_path / 'never_built'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{data}:3:" in err
    assert not (tmp_path / "never_built").exists()  # failed before the toy world was built


def test_unknown_and_ill_typed_keys_are_named(capsys):
    assert main(["algorithm.num_responses=4"]) == 2
    assert "unknown configuration key 'algorithm.num_responses'" in capsys.readouterr().err
    assert main(["algorithm.max_steps=many"]) == 2
    assert "algorithm.max_steps" in capsys.readouterr().err


def test_semantic_checks_name_the_key():
    for overrides, key in [
        (["algorithm.preference_loss_weight=0", "algorithm.sft_loss_weight=0"], "preference_loss_weight"),
        (["algorithm.global_batch_size=10", "algorithm.micro_batch_size=4"], "global_batch_size"),
        (["data.on_bad_line=ignore"], "data.on_bad_line"),
        (["logger.wandb.mode=loud"], "logger.wandb.mode"),
        (["cluster.learner.workers=0"], "cluster.learner.workers"),
        (["model.toy.answer_target=40"], "model.toy.answer_target"),
        (["model.toy.answer_steps=0"], "model.toy.answer_steps"),
        (["algorithm=meta_rewarding", "model.toy.meta_judgements=0"], "model.toy.meta_judgements"),
    ]:
        try:
            load_config(overrides)
        except ConfigError as e:
            assert key in str(e), (overrides, str(e))
        else:
            raise AssertionError(f"{overrides} was accepted")


def test_defaults_are_the_toy_world():
    cfg = load_config([])
    assert cfg.algorithm.name == "self_rewarding" and cfg.model.name == "toy" and cfg.model.path is None
    assert cfg.cluster.address == "" and cfg.cluster.learner.workers == 2
    assert cfg.cluster.generators.replicas == 1 and cfg.cluster.judges.replicas == 1


def test_per_iteration_lists_and_limits():
    from orchestration.config import limited, per_iteration

    cfg = load_config(["algorithm.length_control=[0,0.3]", "algorithm.ref_policy_kl_penalty=[0.1,0.5]",
                       "algorithm.max_iterations=2"])
    assert [per_iteration(cfg.algorithm.length_control, t) for t in (0, 1)] == [0.0, 0.3]
    assert per_iteration(cfg.algorithm.ref_policy_kl_penalty, 1) == 0.5
    for overrides, key in [
        (["algorithm.max_iterations=3", "algorithm.length_control=[0,0.1]"], "algorithm.length_control"),
        (["algorithm.max_iterations=3", "algorithm.ref_policy_kl_penalty=[0.1]"], "algorithm.ref_policy_kl_penalty"),
        (["algorithm.preference_loss=kto"], "algorithm.preference_loss"),
        (["algorithm.limit_train_batches=1.5"], "algorithm.limit_train_batches"),
        (["algorithm.limit_val_batches=0"], "algorithm.limit_val_batches"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(overrides)
    assert limited(100, 1.0, 16) == 100 and limited(100, 0.25, 16) == 25
    assert limited(100, 2, 16) == 32 and limited(100, 10, 16) == 100


def test_judge_sampling_fields_default_to_the_policy_one_by_one():
    cfg = load_config(["judge.sampling.temperature=0.3", "judge.sampling.max_new_tokens=null",
                       "algorithm.sampling.max_new_tokens=12"])
    resolved = cfg.judge.sampling.resolve(cfg.algorithm.sampling)
    assert resolved.temperature == 0.3 and resolved.max_new_tokens == 12
    assert resolved.top_p == cfg.judge.sampling.top_p  # set by the toy preset


def test_every_schema_default_works_from_the_python_api_alone():
    """Config() with no YAML: the judge templates' "default" resolves to the rubric the YAML names too."""
    from orchestration import judge_templates
    from orchestration.config import Config, validate

    cfg = Config()
    validate(cfg)
    assert judge_templates.resolve("judge.template", cfg.judge.template) == judge_templates.DEFAULT_TEMPLATE
    assert "{judgement_a}" in judge_templates.resolve("judge.meta_template", cfg.judge.meta_template)
    assert load_config([]).judge.template == "toy"  # the toy world names its own


@pytest.mark.parametrize("overrides, message", [
    (["judge.template='Rate {response}'"], r"judge.template lacks the slot\(s\) \{prompt\}"),
    (["algorithm=meta_rewarding", "judge.meta_template='Pick one: {prompt} {response}'"],
     r"judge.meta_template lacks the slot\(s\) \{judgement_a\}, \{judgement_b\}"),
    (["learner.optim.schedule=cosine"], r"learner.optim.schedule=cosine needs algorithm.max_steps"),
    (["judge.backend=oracle"], r"judge.backend='oracle' is not one of: policy"),
    (["engine.kind=vllm"], r"engine.kind='vllm' is not one of: torch"),
    (["engine.options={prefill: 64}"], r"engine.options.prefill is not an option of the 'torch' engine"),
    (["engine.options={cuda_graphs: 3}"], r"engine.options.cuda_graphs must be true or false, got 3"),
    (["learner.sharding=zero3"], r"learner.sharding='zero3' is not one of: ddp, fsdp2"),
])
def test_checks_that_need_no_work_run_before_the_toy_world_is_built(overrides, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)
    assert main([*overrides, f"output_dir={tmp_path / 'out'}", f"model.toy.cache_dir={tmp_path / 'cache'}"]) == 2
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_cfg_job_prints_the_composed_validated_configuration_and_starts_nothing(tmp_path, capsys):
    import yaml

    out = tmp_path / "out"
    assert main(["--cfg", "job", "algorithm=spin", "algorithm.max_iterations=3", f"output_dir={out}"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["algorithm"]["name"] == "spin" and shown["algorithm"]["max_iterations"] == 3
    assert shown["output_dir"] == str(out) and not out.exists()
    assert main(["--cfg", "job", "algorithm.max_steps=0"]) == 2  # validated, not just composed
    assert "algorithm.max_steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["--cfg", "hydra"])
    assert stop.value.code == 2 and "only '--cfg job'" in capsys.readouterr().err


def test_help_lists_the_groups_with_their_options_and_the_keys(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "algorithm: generate, meta_rewarding, self_rewarding, spin" in text
    assert "model: hf, toy" in text and "--cfg job" in text
    for key in ("judge.{backend", "cluster.{address", "engine.{kind", "max_time_per_run"):
        assert key in text, key


def test_an_unknown_group_option_lists_the_choices(capsys):
    assert main(["algorithm=nonexistent"]) == 2
    assert ("algorithm=nonexistent is not a known algorithm: choose one of generate, meta_rewarding, "
            "self_rewarding, spin") in capsys.readouterr().err


@pytest.mark.skipif(not __import__("learner.backends.megatron", fromlist=["available"]).available(),
                    reason="needs megatron-core")
def test_a_megatron_layout_the_model_cannot_take_fails_before_ray_and_wandb(tiny_llama, tmp_path, capsys):
    """tiny_llama has 2 KV heads: tensor parallel 4 cannot split them. Nothing may be left in output_dir."""
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "t2 t3"}]}) + "\n")
    out = tmp_path / "out"
    code = main(["model=hf", f"model.path={tiny_llama}", f"data.train_file={data}", f"output_dir={out}",
                 "data.chat_template=nemo", "learner.backend=megatron", "learner.tensor_parallel=4",
                 "cluster.learner.workers=4", "algorithm.global_batch_size=4"])
    assert code == 2
    assert "learner.tensor_parallel=4 must divide the model's num_key_value_heads=2" in capsys.readouterr().err
    assert not out.exists()


def test_the_chat_formats_end_of_turn_marker_stops_generation_and_judging():
    """ChatRenderer.stop_strings (the preset's end-of-turn marker) joins the configured stop strings."""
    from orchestration.config import SamplingConfig, sampling_params

    params = sampling_params(SamplingConfig(stop_strings=["\nUser:", "<extra_id_1>"]), ("<extra_id_1>",))
    assert params.stop_strings == ("\nUser:", "<extra_id_1>")  # each once, the configured ones first
    assert sampling_params(SamplingConfig(), ()).stop_strings == ()
