"""Hugging Face <-> megatron layout (no megatron needed), the layout checks, and the CPU shim."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from learner.backends import megatron
from learner.backends.megatron import convert
from learner.backends.megatron.model import model_shape
from orchestration.config import ConfigError, load_config

FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=255, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(vocab_size=255, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)),
}


def hf_state(family: str) -> tuple[dict, object]:
    cls, config = FAMILIES[family]
    torch.manual_seed(0)
    return cls(config).state_dict(), config


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("transformer_engine", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_hf_megatron_hf_round_trip_is_exact(family, transformer_engine, tp):
    state, config = hf_state(family)
    shape = model_shape(config, tp)
    full = convert.hf_to_megatron(state, shape, transformer_engine)
    back = convert.megatron_to_hf(full, shape, transformer_engine)
    expected = {k: v for k, v in state.items() if not (shape.tied and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name
    for rule in convert.rules(shape, transformer_engine):  # tensor-parallel slices put back together
        shards = [convert.shard(rule, full[rule.megatron], r, tp) for r in range(tp)]
        assert torch.equal(convert.unshard(rule, shards), full[rule.megatron]), rule.megatron
        if rule.tp_dim is not None:
            assert shards[0].shape[rule.tp_dim] * tp == full[rule.megatron].shape[rule.tp_dim]


def test_fused_qkv_holds_each_group_queries_then_key_then_value():
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=2)
    shape = model_shape(config, tensor_parallel=2)
    def head(first, n):  # head_dim (2) rows per head, each holding the head's label
        return torch.arange(first, first + n).repeat_interleave(2)[:, None].float().expand(-1, 8)

    hf = {"q": head(10, 4), "k": head(20, 2), "v": head(30, 2)}
    rule = next(r for r in convert.rules(shape, False) if r.megatron.endswith("linear_qkv.weight"))
    fused = convert.to_megatron(rule, lambda name: hf[name.split(".")[-2][0]], shape)
    labels = fused[::2, 0].tolist()  # one row per head
    assert labels == [10, 11, 20, 30, 12, 13, 21, 31]
    assert convert.shard(rule, fused, 1, 2)[::2, 0].tolist() == [12, 13, 21, 31]  # rank 1 holds group 1


def test_gate_up_stacked_and_each_rank_holds_its_slice_of_both():
    state, config = hf_state("llama")
    shape = model_shape(config, 2)
    rule = next(r for r in convert.rules(shape, False) if r.megatron == "decoder.layers.0.mlp.linear_fc1.weight")
    gate, up = state["model.layers.0.mlp.gate_proj.weight"], state["model.layers.0.mlp.up_proj.weight"]
    full = convert.to_megatron(rule, state.__getitem__, shape)
    assert torch.equal(full, torch.cat([gate, up]))
    half = shape.ffn // 2
    assert torch.equal(convert.shard(rule, full, 1, 2), torch.cat([gate[half:], up[half:]]))


def test_norm_names_follow_the_layer_spec():
    _, config = hf_state("llama")
    shape = model_shape(config)
    local = {r.hf[0]: r.megatron for r in convert.rules(shape, False)}
    te = {r.hf[0]: r.megatron for r in convert.rules(shape, True)}
    assert local["model.layers.1.input_layernorm.weight"] == "decoder.layers.1.input_layernorm.weight"
    assert local["model.layers.1.post_attention_layernorm.weight"] == "decoder.layers.1.pre_mlp_layernorm.weight"
    assert te["model.layers.1.input_layernorm.weight"] == "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
    assert te["model.layers.1.post_attention_layernorm.weight"] == "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
    assert local["model.norm.weight"] == te["model.norm.weight"] == "decoder.final_layernorm.weight"


def test_vocabulary_padded_with_zero_rows_for_tensor_parallelism():
    state, config = hf_state("qwen2")
    shape = model_shape(config, 2)
    assert (shape.vocab, shape.padded_vocab) == (255, 256)
    full = convert.hf_to_megatron(state, shape)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert full[name].shape[0] == 256 and not full[name][255:].any()


@pytest.mark.parametrize("change, tp, pp, message", [
    ({"num_key_value_heads": 2}, 4, 1, "learner.tensor_parallel=4 must divide the model's num_key_value_heads=2"),
    ({"num_hidden_layers": 3}, 1, 2, "learner.pipeline_parallel=2 must divide the model's num_hidden_layers=3"),
    ({"hidden_act": "gelu"}, 1, 1, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, 1, 1, "RoPE type 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192, "rope_theta": 5e5}}, 1, 1, "low_freq_factor=2.0"),
])
def test_layouts_and_models_that_cannot_be_served_are_named(change, tp, pp, message):
    config = LlamaConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, hidden_size=32)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ValueError) as e:
        model_shape(config, tp, pp)
    assert message in str(e.value)


def test_llama3_rope_scaling_is_read():
    config = LlamaConfig(rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                          "rope_theta": 500000.0})
    shape = model_shape(config)
    assert (shape.rope_theta, shape.rope_scaling_factor) == (500000.0, 32.0)


@pytest.mark.parametrize("overrides, message", [
    (["learner.tensor_parallel=2"], "need learner.backend=megatron"),
    (["learner.backend=megatron", "learner.tensor_parallel=3"],
     "cluster.learner.workers=2 must be divisible by learner.tensor_parallel * learner.pipeline_parallel = 3 * 1"),
    (["learner.backend=megatron", "learner.pipeline_parallel=0"], "learner.pipeline_parallel must be >= 1"),
    (["learner.backend=megatron", "learner.dtype=float16"], "learner.dtype=float16"),
    (["learner.backend=jax"], "learner.backend='jax' is not one of: torch, megatron"),
    (["learner.backend=megatron", "cluster.learner.workers=4", "learner.tensor_parallel=2",
      "algorithm.global_batch_size=6", "algorithm.micro_batch_size=2"], "data-parallel learner ranks = 2 * 2"),
])
def test_learner_layout_configuration_errors_name_the_keys(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    assert message in str(e.value)


def test_megatron_backend_without_megatron_core_says_how_to_install(monkeypatch):
    monkeypatch.setattr(megatron, "available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'selfreward\[megatron\]'"):
        load_config(["learner.backend=megatron"])


@pytest.mark.skipif(not megatron.available(), reason=f"needs megatron-core: {megatron.INSTALL_HINT}")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is inactive where CUDA is available")
def test_cpu_shim_maps_cuda_to_the_cpu_only_while_entered():
    import warnings

    with warnings.catch_warnings():  # megatron's "Apex/Transformer Engine not installed" import notes
        warnings.simplefilter("ignore")
        from megatron.core import tensor_parallel

        from learner.backends.megatron.cpu_compat import cuda_on_cpu

    original = torch.cuda.current_device
    with cuda_on_cpu():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"
        assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker.add("shim-test", 1234)
        outside = torch.get_rng_state()
        with tracker.fork("shim-test"):
            drawn = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), outside)  # the default stream is untouched
        assert torch.equal(drawn, torch.rand(3, generator=torch.Generator().manual_seed(1234)))
    assert torch.cuda.current_device is original
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
