"""The torch engine's own parts on tiny random checkpoints (CPU, float32): its logits against transformers,
bf16, config and name mapping, the sampler's distribution, options from the spec and chunked prefill. What
every engine must do is in test_engine_contract.py."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from actors.engines import EngineSpec, make_engine
from actors.engines.llama import ModelArgs, hf_to_internal, internal_to_hf
from actors.engines.sampling import counter_uniform, sample_tokens
from actors.engines.torch_engine import TorchEngine
from engine_models import CONFIGS, COMMON, PROMPTS, greedy, run, sampled, save_checkpoints


# Tiny matmuls gain nothing from threads (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory)


# ------------------------------------------------------------------------------- 1. matches transformers


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_match_transformers(checkpoints, kind):
    path, model = checkpoints[kind]
    engine = TorchEngine(str(path), max_batch_size=8)

    ours = engine.forward_logits(PROMPTS)
    for prompt, logits in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


def test_bfloat16_runs_close_to_float32(checkpoints):
    path, _ = checkpoints["qwen2"]
    assert (path / "model.safetensors.index.json").exists()
    fp32 = TorchEngine(str(path), max_batch_size=4)
    bf16 = TorchEngine(str(path), max_batch_size=4, dtype="bfloat16")
    assert bf16.named_parameters_hf()["model.norm.weight"].dtype == torch.bfloat16
    for a, b in zip(fp32.forward_logits(PROMPTS), bf16.forward_logits(PROMPTS)):
        torch.testing.assert_close(b, a, atol=0.05, rtol=0)
    results = run(bf16, PROMPTS, sampled(8, return_logprobs=True), seeds=[1, 2, 3, 4])
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


# ------------------------------------------------------------------------------------------- 2. sampler


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


# ------------------------------------------------------------------------------------------ 3. options


def test_options_from_the_spec_and_chunked_prefill(checkpoints):
    path, _ = checkpoints["llama"]
    whole = TorchEngine(str(path), max_batch_size=4)
    options = {"max_prefill_tokens": 12, "cuda_graphs": False, "decode_kernel": False}
    chunked = make_engine(EngineSpec(str(path), max_batch_size=4, options=options))
    assert isinstance(chunked, TorchEngine) and chunked.max_prefill_tokens == 12
    assert chunked._graphs is None and chunked._kernel is False
    # A 12-token budget splits PROMPTS (5, 17, 3, 11 tokens) into several prefill and score chunks.
    params = [greedy(6), sampled(6), greedy(6, return_logprobs=True), sampled(6, return_logprobs=True)]
    a, b = run(whole, PROMPTS, params, seeds=[1, 2, 3, 4]), run(chunked, PROMPTS, params, seeds=[1, 2, 3, 4])
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for x, y in zip(a, b):
        assert (x.logprobs is None) == (y.logprobs is None)
        if x.logprobs is not None:
            torch.testing.assert_close(torch.tensor(y.logprobs), torch.tensor(x.logprobs), atol=1e-5, rtol=0)
    lens = [2, 10, 1, 11]
    for x, y in zip(whole.score(PROMPTS, lens), chunked.score(PROMPTS, lens)):
        torch.testing.assert_close(torch.tensor(y), torch.tensor(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("options, key", [({"max_prefill_tokens": 0}, "max_prefill_tokens"),
                                          ({"max_prefill_tokens": 1.5}, "max_prefill_tokens"),
                                          ({"cuda_graphs": "yes"}, "cuda_graphs"),
                                          ({"decode_kernel": 1}, "decode_kernel")])
def test_bad_option_values_name_the_key(checkpoints, options, key):
    path, _ = checkpoints["llama"]
    with pytest.raises(ValueError, match=rf"engine\.options\.{key} must be"):
        make_engine(EngineSpec(str(path), options=options))
