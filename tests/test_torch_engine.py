"""TorchEngine against transformers on tiny random checkpoints (CPU, float32)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from actors.engines.llama import ModelArgs, hf_to_internal, internal_to_hf
from actors.engines.protocol import GenerationRequest, SamplingParams
from actors.engines.sampling import counter_uniform, sample_tokens
from actors.engines.torch_engine import TorchEngine
from actors.engines.weights import pack_tensors, unpack_bucket

VOCAB = 128
EOS = 2
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    eos_token_id=EOS,
    bos_token_id=1,
    pad_token_id=0,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "llama3_tied": lambda: LlamaConfig(**COMMON, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
}
PROMPTS = [[5, 9, 33, 7, 100], list(range(10, 27)), [3, 4, 5], [77] * 11]


def greedy(max_new: int = 20, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new, **kw)


def sampled(max_new: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=kw.pop("temperature", 1.0), max_new_tokens=max_new, **kw)


# ------------------------------------------------------------------------------------------- fixtures


def _random_model(kind: str, seed: int):
    """A transformers model with every parameter random (norms and biases too, so a swapped mapping shows)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def _save_tokenizer(path: Path) -> None:
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{EOS}", unk_token="t0").save_pretrained(path)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP barriers make them ~100x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    out = {}
    for i, kind in enumerate(CONFIGS):
        path = tmp_path_factory.mktemp(kind)
        model = _random_model(kind, seed=i)
        # qwen2 is saved in several shards to exercise model.safetensors.index.json.
        model.save_pretrained(path, max_shard_size="100KB" if kind == "qwen2" else "10GB")
        _save_tokenizer(path)
        out[kind] = (path, model)
    return out


@pytest.fixture(scope="module")
def llama(checkpoints) -> tuple[TorchEngine, torch.nn.Module]:
    path, model = checkpoints["llama"]
    return TorchEngine(str(path), max_batch_size=8), model


def _hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def _run(engine: TorchEngine, prompts, params, seeds=None):
    seeds = seeds or [0] * len(prompts)
    params = params if isinstance(params, list) else [params] * len(prompts)
    return engine.generate([GenerationRequest(p, s, seed) for p, s, seed in zip(prompts, params, seeds)])


# ------------------------------------------------------------------------------- 1. matches transformers


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_and_greedy_match_transformers(checkpoints, kind):
    path, model = checkpoints[kind]
    engine = TorchEngine(str(path), max_batch_size=8)

    ours = engine.forward_logits(PROMPTS)
    for prompt, logits in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)

    results = _run(engine, PROMPTS, greedy(20))
    for prompt, result in zip(PROMPTS, results):
        expected = _hf_greedy(model, prompt, 20)
        assert result.token_ids == expected
        assert result.finish_reason == ("stop" if expected[-1] == EOS else "length")
    # A degenerate model (all prompts -> same repeated token) would make this test vacuous.
    assert len({tuple(r.token_ids) for r in results}) > 1


def test_bfloat16_runs_close_to_float32(checkpoints):
    path, _ = checkpoints["qwen2"]
    assert (path / "model.safetensors.index.json").exists()
    fp32 = TorchEngine(str(path), max_batch_size=4)
    bf16 = TorchEngine(str(path), max_batch_size=4, dtype="bfloat16")
    assert bf16.named_parameters_hf()["model.norm.weight"].dtype == torch.bfloat16
    for a, b in zip(fp32.forward_logits(PROMPTS), bf16.forward_logits(PROMPTS)):
        torch.testing.assert_close(b, a, atol=0.05, rtol=0)
    results = _run(bf16, PROMPTS, sampled(8, return_logprobs=True), seeds=[1, 2, 3, 4])
    assert all(len(r.token_ids) == len(r.logprobs) > 0 for r in results)


def test_config_validation():
    with pytest.raises(ValueError, match="yarn"):
        ModelArgs.from_hf_config(LlamaConfig(**COMMON, rope_scaling={"rope_type": "yarn", "factor": 2.0}), 256)
    with pytest.raises(ValueError, match="sliding_window=128"):
        ModelArgs.from_hf_config(MistralConfig(**COMMON, sliding_window=128), 256)
    assert ModelArgs.from_hf_config(MistralConfig(**COMMON, sliding_window=256), 256).num_layers == 2
    qwen = ModelArgs.from_hf_config(Qwen2Config(**COMMON), 256)
    assert qwen.qkv_bias and not qwen.o_bias
    # The name mapping, both ways: q/k/v are row ranges of the fused wqkv (q: 4 heads x 16, k/v: 2 x 16).
    fused = internal_to_hf(qwen)["layers.1.attn.wqkv.bias"]
    assert [(e.hf_name, e.rows) for e in fused] == [
        ("model.layers.1.self_attn.q_proj.bias", (0, 64)),
        ("model.layers.1.self_attn.k_proj.bias", (64, 96)),
        ("model.layers.1.self_attn.v_proj.bias", (96, 128)),
    ]
    assert hf_to_internal(qwen)["lm_head.weight"].internal_name == "lm_head.weight"


# ------------------------------------------------------------------------------------ 2. determinism


def test_sampling_is_batch_invariant_and_seeded(llama):
    engine, _ = llama
    target = GenerationRequest(PROMPTS[0], sampled(16, top_p=0.95), seed=1234)
    others = [
        GenerationRequest(PROMPTS[1], sampled(9, top_k=5), seed=7),
        GenerationRequest(PROMPTS[2], greedy(12), seed=0),
        GenerationRequest(PROMPTS[3], sampled(20, temperature=0.7), seed=99),
    ]
    alone = engine.generate([target])[0].token_ids
    first = engine.generate([target, *others])[0].token_ids
    last = engine.generate([*others[::-1], target])[-1].token_ids
    assert alone == first == last
    assert len(alone) == 16

    other_seed = engine.generate([GenerationRequest(PROMPTS[0], target.sampling, seed=1235)])[0].token_ids
    assert other_seed != alone
    assert alone != _run(engine, [PROMPTS[0]], greedy(16))[0].token_ids  # it really sampled


def test_sampler_follows_the_distribution():
    n, logits = 40000, torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = logits.expand(n, -1)
    seeds = torch.arange(n, dtype=torch.int64)

    def freqs(temperature=1.0, top_k=0, top_p=1.0):
        toks = sample_tokens(
            rows, torch.full((n,), temperature), torch.full((n,), top_k), torch.full((n,), top_p),
            seeds, torch.zeros(n, dtype=torch.int64), torch.full((n,), 3),
        )
        return torch.bincount(toks, minlength=6).float() / n

    torch.testing.assert_close(freqs(), logits.softmax(-1), atol=0.01, rtol=0)
    torch.testing.assert_close(freqs(temperature=0.5), (logits / 0.5).softmax(-1), atol=0.01, rtol=0)
    top2 = torch.zeros(6)
    top2[:2] = logits[:2].softmax(-1)
    torch.testing.assert_close(freqs(top_k=2), top2, atol=0.01, rtol=0)
    # p(0) ~ 0.53 < 0.6 <= p(0) + p(1): top_p=0.6 keeps exactly two tokens.
    torch.testing.assert_close(freqs(top_p=0.6), top2, atol=0.01, rtol=0)
    # top-p applies to the renormalised top-k distribution (as in transformers): within the top 3 the
    # first two hold 0.86 >= 0.8, so the third is dropped (on the full distribution it would survive).
    torch.testing.assert_close(freqs(top_k=3, top_p=0.8), top2, atol=0.01, rtol=0)
    u = counter_uniform(seeds, torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean().item() - 0.5) < 0.01


# ---------------------------------------------------------------------------- 3. continuous batching


def test_more_requests_than_slots(checkpoints):
    path, _ = checkpoints["qwen2"]
    engine = TorchEngine(str(path), max_batch_size=2)
    prompts = [PROMPTS[i % 4][: 3 + i] for i in range(7)]
    params = [greedy(4 + 3 * i) for i in range(7)]
    together = _run(engine, prompts, params)
    for prompt, param, result in zip(prompts, params, together):
        alone = _run(engine, [prompt], param)[0]
        assert result.token_ids == alone.token_ids
        assert result.finish_reason == alone.finish_reason


# ------------------------------------------------------------------------------------------ 4. stopping


def test_stop_token_length_and_stop_string(llama):
    engine, _ = llama
    free = _run(engine, [PROMPTS[1]], greedy(20))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    tokens = free.token_ids

    stop_id = tokens[6]
    cut = tokens.index(stop_id) + 1
    r = _run(engine, [PROMPTS[1]], greedy(20, stop_token_ids=(stop_id,)))[0]
    assert r.finish_reason == "stop" and r.token_ids == tokens[:cut] and r.token_ids[-1] == stop_id
    assert r.stop_text is None

    short = _run(engine, [PROMPTS[1]], greedy(7))[0]
    assert short.finish_reason == "length" and short.token_ids == tokens[:7]

    stop = engine.tokenizer.decode(tokens[8:10])  # spans two tokens
    text_cut = next(j for j in range(1, 21) if stop in engine.tokenizer.decode(tokens[:j]))
    r = _run(engine, [PROMPTS[1]], greedy(20, stop_strings=("never appears", stop)))[0]
    assert r.finish_reason == "stop" and r.stop_text == stop and r.token_ids == tokens[:text_cut]

    # The engine's own EOS (config / tokenizer) stops too, and the stop token is kept.
    eos_at = tokens[3]
    engine.stop_token_ids.add(eos_at)
    try:
        r = _run(engine, [PROMPTS[1]], greedy(20))[0]
    finally:
        engine.stop_token_ids.discard(eos_at)
    assert r.finish_reason == "stop" and r.token_ids == tokens[: tokens.index(eos_at) + 1]


def test_length_limits(checkpoints):
    path, _ = checkpoints["llama"]
    engine = TorchEngine(str(path), max_batch_size=2, max_seq_len=24)
    r = _run(engine, [list(range(3, 23))], greedy(50))[0]  # 20 prompt tokens: room for 4 more
    assert r.finish_reason == "length" and len(r.token_ids) == 4
    with pytest.raises(ValueError, match="24 tokens exceeds the limit of 23"):
        _run(engine, [list(range(24))], greedy(5))


# -------------------------------------------------------------------------------------- 5. filters


def test_top_k_1_and_tiny_top_p_are_greedy(llama):
    engine, _ = llama
    reference = [r.token_ids for r in _run(engine, PROMPTS, greedy(12))]
    seeds = [11, 22, 33, 44]
    for params in (sampled(12, top_k=1), sampled(12, top_p=1e-6), sampled(12, temperature=1.5, top_k=1)):
        assert [r.token_ids for r in _run(engine, PROMPTS, params, seeds)] == reference


def test_logprobs_are_unscaled_model_logprobs(llama):
    engine, _ = llama
    r = _run(engine, [PROMPTS[0]], sampled(8, temperature=1.3, return_logprobs=True), seeds=[5])[0]
    scored = engine.score([PROMPTS[0] + r.token_ids], [len(PROMPTS[0])])[0]
    np.testing.assert_allclose(r.logprobs, scored, atol=1e-4)


# -------------------------------------------------------------------------------------- 6. refit


def test_load_weights_from_buckets(checkpoints):
    path, _ = checkpoints["llama3_tied"]
    engine = TorchEngine(str(path), max_batch_size=4)
    other = _random_model("llama3_tied", seed=123)
    named = dict(other.named_parameters())  # tied: lm_head is deduplicated away
    names = list(named)
    buckets = [pack_tensors({n: named[n] for n in names[i::3]}) for i in range(3)]
    for b in buckets:
        b.data.setflags(write=False)  # as read from Ray's object store

    before = _run(engine, PROMPTS, greedy(10))
    extra = "model.layers.9.mlp.up_proj.weight"
    bad_cases = {
        "missing": ([pack_tensors({n: named[n] for n in names[1:]})], names[0]),
        "extra": (buckets + [pack_tensors({extra: named[names[1]]})], extra),
        "mis-shaped": ([pack_tensors({**named, names[2]: named[names[2]][:-1]})], names[2]),
        "duplicate": (buckets + [pack_tensors({names[4]: named[names[4]]})], names[4]),
    }
    for case, (bad, culprit) in bad_cases.items():
        with pytest.raises(ValueError, match=culprit.replace(".", r"\.")):
            engine.load_weights(bad, version=99)
    assert engine.weight_version == 0
    assert [r.token_ids for r in _run(engine, PROMPTS, greedy(10))] == [r.token_ids for r in before]

    engine.load_weights(buckets, version=7)
    results = _run(engine, PROMPTS, greedy(10))
    assert all(r.weight_version == 7 for r in results)
    assert [r.token_ids for r in results] == [_hf_greedy(other, p, 10) for p in PROMPTS]
    assert [r.token_ids for r in results] != [r.token_ids for r in before]
    for name, value in engine.named_parameters_hf().items():
        torch.testing.assert_close(value, named[name], atol=0, rtol=0)


def test_bucket_roundtrip_is_zero_copy():
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.randn(2, 2, 3).to(torch.float16),
    }
    bucket = pack_tensors(tensors)
    assert all(off % 64 == 0 for off in bucket.offsets)
    bucket.data.setflags(write=False)
    views = unpack_bucket(bucket)
    for name, t in tensors.items():
        assert views[name].dtype == t.dtype and torch.equal(views[name], t)
    base = bucket.data.ctypes.data
    assert views["b"].data_ptr() == base + bucket.offsets[1]


# ------------------------------------------------------------------------------------------- 7. score


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_score_matches_transformers(checkpoints, kind):
    path, model = checkpoints[kind]
    engine = TorchEngine(str(path), max_batch_size=4)
    prompt_lens = [2, 10, 1, 11]
    got = engine.score(PROMPTS, prompt_lens)
    for seq, p, lps in zip(PROMPTS, prompt_lens, got):
        with torch.no_grad():
            logp = model(torch.tensor([seq])).logits[0].log_softmax(-1)
        expected = [logp[t - 1, seq[t]].item() for t in range(p, len(seq))]
        assert len(lps) == len(seq) - p
        np.testing.assert_allclose(lps, expected, atol=1e-4)
        assert all(math.isfinite(x) for x in lps)
