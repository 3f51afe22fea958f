"""The engine's KV cache is sized from a memory budget, not from max_batch_size x max_seq_len: the budget
resolution (CPU default, absolute GB, a fraction of a GPU's total memory), budget -> slots arithmetic, the
error when nothing fits, identical results whatever the slot count, the config keys, and a SmolLM2-shaped
model within the CPU default budget."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from actors.engines import (DEFAULT_CPU_KV_CACHE_GB, DEFAULT_GPU_MEMORY_FRACTION, DEFAULT_MAX_CONTEXT, EngineSpec,
                            make_engine)
from actors.engines.cuda_graphs import DecodeGraphs
from actors.engines.kv_cache import GB, CacheBudget, cache_budget, plan_cache
from actors.engines.torch_engine import TorchEngine
from engine_models import COMMON, PROMPTS, greedy, run, sampled, save_checkpoints, save_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

H200_TOTAL = 143_771 * 2**20  # bytes, what the device reports (nvidia-smi: 143771 MiB)


def budget(nbytes: int) -> CacheBudget:
    return CacheBudget(nbytes, "test")


def plan(budget_bytes: int, *, layers=30, kv_heads=3, head_dim=64, dtype=torch.float32, ctx=4096, cap=64):
    return plan_cache(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, max_seq_len=ctx,
                      max_batch_size=cap, budget=budget(budget_bytes))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory)


# --------------------------------------------------------------------------------------------- arithmetic


def test_slots_are_the_budget_over_one_full_context_sequence():
    # SmolLM2-135M, float32: 2 (k, v) x 30 layers x 3 KV heads x 64 x 4 bytes = 46,080 bytes per token.
    p = plan(2 * GB)
    assert p.bytes_per_slot == 46_080 * 4096 == 188_743_680
    assert p.slots == 2 * GB // 188_743_680 == 10
    assert p.cache_bytes == 10 * 188_743_680 <= 2 * GB
    assert "10 slots" in str(p) and "capped by the budget" in str(p)
    # bfloat16 halves a slot: twice the sequences in the same budget.
    assert plan(2 * GB, dtype=torch.bfloat16).bytes_per_slot == 188_743_680 // 2
    assert plan(2 * GB, dtype=torch.bfloat16).slots == 21
    # Only KV heads count (grouped-query attention): 9 query heads, 3 KV heads; full MHA would take 3x.
    assert plan(2 * GB, kv_heads=9).slots == 3
    # A shorter context gives more slots; max_batch_size stays the cap.
    assert plan(2 * GB, ctx=1024).slots == 42
    assert plan(2 * GB, ctx=1024, cap=16).slots == 16
    assert "capped by max_batch_size" in str(plan(2 * GB, ctx=1024, cap=16))
    assert plan(188_743_680).slots == 1  # exactly one slot's bytes: one slot


def test_budget_resolution_on_cpu_and_cuda(monkeypatch):
    assert cache_budget("cpu", None, DEFAULT_GPU_MEMORY_FRACTION).bytes == int(DEFAULT_CPU_KV_CACHE_GB * GB) == 2 * GB
    assert cache_budget("cpu", 0.5, DEFAULT_GPU_MEMORY_FRACTION).bytes == 500_000_000
    # On CUDA the default is a fraction of the device's total memory; an absolute budget still wins.
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: asked.append(device) or types.SimpleNamespace(total_memory=H200_TOTAL))
    gpu = cache_budget("cuda", None, 0.3)
    assert gpu.bytes == int(0.3 * H200_TOTAL) and gpu.device_total == H200_TOTAL
    assert "engine.gpu_memory_fraction=0.3" in gpu.source
    assert asked == [torch.device("cuda")]
    assert cache_budget("cuda:0", 10, 0.3).bytes == 10 * GB
    # Llama-3.2-1B, bf16 (16 layers x 8 KV heads x 64): 32 KiB per token, 128 MiB per 4096-token slot;
    # 0.3 of an H200 holds 336 of them, so max_batch_size (64) is the cap: 8.6 GB.
    one_b = dict(layers=16, kv_heads=8, head_dim=64, dtype=torch.bfloat16)
    p = plan_cache(num_layers=16, num_kv_heads=8, head_dim=64, dtype=torch.bfloat16, max_seq_len=4096,
                   max_batch_size=64, budget=gpu)
    assert (p.bytes_per_slot, p.slots, p.cache_bytes) == (2**27, 64, 64 * 2**27)
    assert plan(gpu.bytes, **one_b, cap=1024).slots == 336


def test_nothing_fits_names_the_keys_and_the_numbers(checkpoints):
    with pytest.raises(ValueError) as e:
        plan(100_000_000)
    message = str(e.value)
    for part in ("engine.kv_cache_memory_gb", "model.max_seq_len=4096", "0.189 GB", "30 layers", "3 KV heads",
                 "at least 0.189", "at most 2170"):  # 100e6 // 46,080 bytes per token
        assert part in message, (part, message)
    gpu = CacheBudget(int(0.001 * H200_TOTAL), "engine.gpu_memory_fraction=0.001 of the GPU's 150.8 GB", H200_TOTAL)
    with pytest.raises(ValueError, match=r"raise engine\.gpu_memory_fraction to at least 0\.002 or set "
                                         r"engine\.kv_cache_memory_gb to at least 0\.189"):
        plan_cache(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.float32, max_seq_len=4096,
                   max_batch_size=64, budget=gpu)
    # Through the spec: the engine fails before it allocates weights or cache.
    path, _ = checkpoints["llama"]
    with pytest.raises(ValueError, match=r"engine\.kv_cache_memory_gb.*model\.max_seq_len"):
        make_engine(EngineSpec(str(path), kv_cache_memory_gb=1e-6))


@pytest.mark.parametrize("key, value", [("kv_cache_memory_gb", 0), ("kv_cache_memory_gb", -1.0),
                                        ("kv_cache_memory_gb", True), ("gpu_memory_fraction", 0.0),
                                        ("gpu_memory_fraction", 1.5), ("gpu_memory_fraction", "half")])
def test_budget_settings_out_of_range_name_the_key(key, value):
    from orchestration.config import ConfigError, load_config

    with pytest.raises(ValueError, match=rf"engine\.{key}"):
        EngineSpec("unused", **{key: value})
    if not isinstance(value, (bool, str)):  # (the typed schema rejects those itself)
        with pytest.raises(ConfigError, match=rf"engine\.{key}"):
            load_config([f"engine.{key}={value}"])


def test_the_config_keys_reach_both_engine_specs():
    from orchestration.config import load_config
    from orchestration.driver import _engine_specs, _Weights

    cfg = load_config([])
    assert (cfg.engine.kv_cache_memory_gb, cfg.engine.gpu_memory_fraction) == (None, DEFAULT_GPU_MEMORY_FRACTION)
    cfg = load_config(["engine.kv_cache_memory_gb=1.5", "engine.gpu_memory_fraction=0.2"])
    for spec in _engine_specs(cfg, _Weights(policy="p", engines="m")):
        assert (spec.kv_cache_memory_gb, spec.gpu_memory_fraction) == (1.5, 0.2)


def test_decode_graph_shapes_stay_within_a_slot_count_that_is_not_a_power_of_two():
    graphs = DecodeGraphs(lambda rows, kv_len: None, max_rows=10, max_kv_len=4096)  # captures nothing yet
    assert graphs.shape(1, 10) == (1, 256)
    assert graphs.shape(9, 300) == (10, 512)
    assert graphs.shape(10, 4096) == (10, 4096)


# --------------------------------------------------------------------------- same results, fewer slots


def test_one_or_two_slots_give_the_tokens_of_many(checkpoints):
    path, _ = checkpoints["llama"]
    # The tiny llama: 2 layers x 2 KV heads x 16 head dim x 4 bytes x 2 x 256 positions = 65,536 bytes a slot.
    per_slot = 2 * COMMON["num_hidden_layers"] * COMMON["num_key_value_heads"] * 16 * 4 * COMMON["max_position_embeddings"]
    many = TorchEngine(str(path), max_batch_size=16)
    one = make_engine(EngineSpec(str(path), max_batch_size=16, kv_cache_memory_gb=1.5 * per_slot / GB))
    two = make_engine(EngineSpec(str(path), max_batch_size=16, kv_cache_memory_gb=2.5 * per_slot / GB))
    assert (many.max_batch_size, one.max_batch_size, two.max_batch_size) == (16, 1, 2)
    assert (one.cache_plan.slots, one.cache_plan.bytes_per_slot) == (1, per_slot)
    assert one.cache.k.shape[1] == 1 and two.cache.k.shape[1] == 2
    prompts = PROMPTS * 2
    params = [greedy(12), sampled(12), greedy(9, return_logprobs=True), sampled(14, return_logprobs=True)] * 2
    seeds = list(range(1, len(prompts) + 1))
    expected = run(many, prompts, params, seeds)
    for engine in (one, two):
        got = run(engine, prompts, params, seeds)
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]
        assert [r.finish_reason for r in got] == [r.finish_reason for r in expected]
        for x, y in zip(expected, got):
            assert (x.logprobs is None) == (y.logprobs is None)
            if x.logprobs is not None:
                torch.testing.assert_close(torch.tensor(y.logprobs), torch.tensor(x.logprobs), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ a real model's shape


def test_a_smollm2_shaped_model_fits_the_cpu_default_budget(tmp_path):
    """SmolLM2-135M's shape with random weights: the defaults (max_batch_size 64, the model's 8192 positions
    capped at 4096, float32) allocated a 12 GB cache before; now 10 slots, 1.89 GB, within 2 GB."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = LlamaForCausalLM(config).state_dict()
    # bf16 on disk (half the bytes to write); the engine casts to its float32.
    from safetensors.torch import save_file

    weights = {n: (0.02 * torch.randn(t.shape)).to(torch.bfloat16) for n, t in shapes.items() if n != "lm_head.weight"}
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    del weights

    engine = make_engine(EngineSpec(str(tmp_path)))
    p = engine.cache_plan
    assert engine.max_seq_len == DEFAULT_MAX_CONTEXT
    assert (p.slots, p.bytes_per_slot, p.max_batch_size) == (10, 188_743_680, 64)
    allocated = sum(t.numel() * t.element_size() for t in (engine.cache.k, engine.cache.v))
    assert allocated == p.cache_bytes <= DEFAULT_CPU_KV_CACHE_GB * GB
    assert engine.cache.k.shape == (30, 10, 3, 4096, 64)
    [result] = run(engine, [[5, 9, 33]], greedy(2))
    assert len(result.token_ids) >= 1
