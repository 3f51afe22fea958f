"""SPIN: pair construction (ground truth chosen, M_t's generation rejected), bad samples, the previous
iteration's generations, configuration checks, and the DPO loss on SPIN pairs against an independent
computation."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from actors.engines.protocol import GenerationResult
from learner.backends.torch_backend import TorchBackend
from learner.types import LossConfig, OptimConfig, TrainSample
from orchestration.algorithms.iterative import IterationSummary
from orchestration.algorithms.spin import NOT_ENDED, Spin
from orchestration.config import ConfigError, load_config
from orchestration.main import main
from orchestration.rollout import PromptRecord, ScoredPrompt

ANSWER = [7, 8, 2]  # ground-truth answer tokens, ending with the end-of-turn token


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 2))


def make_spin(tmp_path, *overrides):
    cfg = load_config(["algorithm=spin", f"output_dir={tmp_path}", *overrides])
    ctx = SimpleNamespace(tokenizer=FakeTokenizer(), evaluator=None, renderer=SimpleNamespace(stop_strings=()))
    spin = Spin(cfg, ctx, pools=None, checkpoints=None, reference_dir="")
    spin._previous, spin._keep, spin._written = None, None, set()
    return spin


def scored(index, tokens, finish="stop", version=0):
    record = PromptRecord(index, 0, [1, 5, index], f"question {index}", f"question {index}", {}, ANSWER)
    result = GenerationResult(tokens, finish, version)
    return ScoredPrompt(record, [result], [FakeTokenizer().decode(tokens)], [None])


def test_ground_truth_is_chosen_and_the_generation_rejected(tmp_path):
    spin = make_spin(tmp_path)
    summary = IterationSummary(0)
    [outcome] = spin._outcomes(scored(3, [9, 9, 2]), summary)
    assert outcome.sample == TrainSample([1, 5, 3], ANSWER, [9, 9, 2])
    assert (outcome.chosen_text, outcome.rejected_text) == ("7 8", "9 9")
    assert outcome.stats.prompts == 1 and outcome.stats.bad_samples == 0


def test_unended_generation_is_a_counted_bad_sample(tmp_path):
    spin = make_spin(tmp_path)
    summary = IterationSummary(0)
    [outcome] = spin._outcomes(scored(4, [9, 9, 9], finish="length"), summary)
    assert outcome.sample is None and outcome.reason == NOT_ENDED
    assert summary.stats.bad_samples == 1 and summary.stats.unended == 1


def test_generation_from_another_weight_version_is_refused(tmp_path):
    spin = make_spin(tmp_path)
    with pytest.raises(RuntimeError, match="weight version 1"):
        spin._outcomes(scored(4, [9, 2], version=1), IterationSummary(0))


def test_previous_iteration_generations_become_extra_rejected_samples(tmp_path):
    spin = make_spin(tmp_path, "spin.mix_previous_iteration=true")
    path = spin._generations_file(0)
    path.parent.mkdir(parents=True)
    with path.open("w") as keep:  # iteration 0 keeps its ended generations, once per prompt
        spin._keep = keep
        spin._outcomes(scored(3, [9, 9, 2]), IterationSummary(0))
        spin._outcomes(scored(3, [9, 9, 2]), IterationSummary(0))  # a second epoch repeats the prompt
        spin._outcomes(scored(4, [6, 6, 6], finish="length"), IterationSummary(0))
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["index"] for row in kept] == [3]
    with path.open("a") as f:
        f.write('{"index": 4, "tok')  # a torn line from a crash is ignored
    from orchestration.algorithms.spin import PreviousGenerations

    spin._keep, spin._previous, spin.version = None, PreviousGenerations(path), 1
    current, extra = spin._outcomes(scored(3, [5, 2], version=1), IterationSummary(1))
    assert current.sample.rejected_ids == [5, 2]
    assert extra.sample == TrainSample([1, 5, 3], ANSWER, [9, 9, 2])
    assert extra.stats.prompts == 0  # not a prompt of this iteration: rates stay per prompt
    assert len(spin._outcomes(scored(4, [5, 2], version=1), IterationSummary(1))) == 1  # nothing kept for 4
    spin._previous.close()


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.preference_loss=rpo_sq"], "algorithm.preference_loss"),
    (["algorithm.preference_loss=scale"], "algorithm.preference_loss"),
    (["algorithm.first_iteration_sft=true"], "algorithm.first_iteration_sft"),
])
def test_spin_configuration_checks(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(["algorithm=spin", *overrides])


def test_spin_defaults_follow_the_guide():
    # model=hf without its path: the toy model group would resize the run for the toy model
    a = load_config(["algorithm=spin", "model=hf", "model.path=null", "model.name=toy"]).algorithm
    assert (a.name, a.max_iterations, a.max_epochs, a.ref_policy_kl_penalty, a.global_batch_size) == \
        ("spin", 1, 1, 0.1, 64)


def test_prompt_without_answer_fails_at_start_up_with_its_line(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    with_answer = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}
    data.write_text(json.dumps(with_answer) + "\n" + json.dumps({"messages": with_answer["messages"][:1]}) + "\n")
    code = main(["algorithm=spin", f"data.train_file={data}", f"output_dir={tmp_path / 'out'}",
                 f"model.toy.cache_dir={tmp_path / 'never_built'}"])
    assert code == 2
    assert f"{data}:2:" in capsys.readouterr().err
    assert not (tmp_path / "never_built").exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def sequence_logprob(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0, :-1].float()
    logp = F.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[len(prompt) - 1:].sum()


def test_spin_dpo_loss_matches_an_independent_computation(tiny_model, tmp_path):
    spin = make_spin(tmp_path)
    pairs = [spin._outcomes(scored(i, [10 + i, 11, 2]), IterationSummary(0))[0].sample for i in range(4)]
    beta = 0.1
    backend = TorchBackend(tiny_model, OptimConfig(lr=1e-2, micro_batch_size=4, warmup_steps=0))
    first = backend.train_step(pairs, LossConfig(beta=beta))
    assert first["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)  # pi == pi_ref
    policy = LlamaForCausalLM.from_pretrained(tiny_model)
    policy.load_state_dict(backend.module.state_dict())  # the weights the second step starts from
    reference = LlamaForCausalLM.from_pretrained(tiny_model)
    second = backend.train_step(pairs, LossConfig(beta=beta))
    with torch.no_grad():
        losses = []
        for s in pairs:
            lc = sequence_logprob(policy, s.prompt_ids, s.chosen_ids) - sequence_logprob(reference, s.prompt_ids, s.chosen_ids)
            lr = sequence_logprob(policy, s.prompt_ids, s.rejected_ids) - sequence_logprob(reference, s.prompt_ids, s.rejected_ids)
            losses.append(-F.logsigmoid(beta * (lc - lr)))
    assert second["preference_loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-4)
    assert second["preference_loss"] < first["preference_loss"]
