"""Tiny random Hugging Face checkpoints of each supported family, and helpers, for the engine tests
(test_engine_contract.py holds every engine to them; test_torch_engine.py tests the torch engine's own parts)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

from actors.engines.protocol import GenerationRequest, SamplingParams

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


def random_model(family: str, seed: int):
    """A transformers model with every parameter random (norms and biases too, so a swapped mapping shows)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save_tokenizer(path: Path) -> None:
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{EOS}", unk_token="t0").save_pretrained(path)


def save_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """One checkpoint directory per family in CONFIGS, with the transformers model it holds."""
    out = {}
    for i, family in enumerate(CONFIGS):
        path = tmp_path_factory.mktemp(family)
        model = random_model(family, seed=i)
        # qwen2 is saved in several shards to exercise model.safetensors.index.json.
        model.save_pretrained(path, max_shard_size="100KB" if family == "qwen2" else "10GB")
        save_tokenizer(path)
        out[family] = (path, model)
    return out


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def run(engine, prompts, params, seeds=None):
    seeds = seeds or [0] * len(prompts)
    params = params if isinstance(params, list) else [params] * len(prompts)
    return engine.generate([GenerationRequest(p, s, seed) for p, s, seed in zip(prompts, params, seeds)])
