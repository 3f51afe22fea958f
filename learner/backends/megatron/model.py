"""megatron-core GPTModel for Llama-family Hugging Face checkpoints (Llama 2/3.x, Mistral, Qwen2 with QKV bias).

`ModelShape` is everything the backend and the weight conversion need from a Hugging Face config; `build`
makes this pipeline stage's GPTModel: Transformer Engine layers when `transformer_engine` imports, megatron's
local layer spec (torch layers) otherwise.
"""

from __future__ import annotations

import importlib

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# megatron's llama3 RoPE scaling takes only the factor; the other three parameters are fixed to these values.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    padded_vocab: int  # vocab rounded up to a multiple of the tensor-parallel size (extra rows are masked)
    qkv_bias: bool
    tied: bool
    norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None  # llama3-style RoPE scaling, None = plain RoPE
    max_positions: int
    attention_dropout: float
    sliding_window: int | None
    init_std: float

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads


def model_shape(hf_config, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> ModelShape:
    """Read and check a Hugging Face config; errors name what cannot be served and why."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"learner.backend=megatron supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                         f"the checkpoint is {model_type!r}")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_config.hidden_act!r} is not supported (Llama-family models use silu)")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=true is not supported by the megatron backend")
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads or hf_config.num_attention_heads
    layers = hf_config.num_hidden_layers
    if kv_heads % tensor_parallel:
        raise ValueError(f"learner.tensor_parallel={tensor_parallel} must divide the model's "
                         f"num_key_value_heads={kv_heads}")
    if layers % pipeline_parallel:
        raise ValueError(f"learner.pipeline_parallel={pipeline_parallel} must divide the model's "
                         f"num_hidden_layers={layers}")
    theta, factor = _rope(hf_config)
    vocab = hf_config.vocab_size
    qkv_bias = model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
    return ModelShape(
        layers=layers, hidden=hf_config.hidden_size, heads=heads, kv_heads=kv_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        ffn=hf_config.intermediate_size, vocab=vocab, padded_vocab=-(-vocab // tensor_parallel) * tensor_parallel,
        qkv_bias=qkv_bias, tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
        norm_eps=hf_config.rms_norm_eps, rope_theta=theta, rope_scaling_factor=factor,
        max_positions=hf_config.max_position_embeddings,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        sliding_window=_sliding_window(hf_config),
        init_std=float(getattr(hf_config, "initializer_range", 0.02)),
    )


def _rope(hf_config) -> tuple[float, float | None]:
    """(theta, llama3 scaling factor or None). transformers >= 5 keeps both in `rope_parameters`."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by the megatron backend")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"RoPE type {rope_type!r} is not supported by the megatron backend (default, llama3)")
    for key, value in _LLAMA3_FIXED.items():
        if float(params.get(key, value)) != value:
            raise ValueError(f"llama3 RoPE with {key}={params[key]} is not supported: "
                             f"megatron-core fixes it to {value}")
    return theta, float(params["factor"])


def _sliding_window(hf_config) -> int | None:
    window = getattr(hf_config, "sliding_window", None)
    if window is None or not getattr(hf_config, "use_sliding_window", True):  # Qwen2 keeps an unused value
        return None
    return int(window)


def transformer_engine_available() -> bool:
    try:
        importlib.import_module("transformer_engine")  # imported, not just found: a broken install counts as absent
    except ImportError:
        return False
    return True


def layer_spec(use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def transformer_config(shape: ModelShape, *, tensor_parallel: int, pipeline_parallel: int,
                       dtype: torch.dtype, on_gpu: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads, kv_channels=shape.head_dim, ffn_hidden_size=shape.ffn,
        normalization="RMSNorm", layernorm_epsilon=shape.norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0, attention_dropout=shape.attention_dropout,
        # HF's window counts the query token itself; megatron's (left, right) counts the tokens beside it.
        window_size=(shape.sliding_window - 1, 0) if shape.sliding_window else None,
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        # Micro-batches are padded to their own longest sequence, so pipeline stages exchange shapes.
        variable_seq_lengths=pipeline_parallel > 1,
        moe_token_dispatcher_type="alltoall",  # no experts; the default (allgather) rejects variable lengths
        # Initialization is overwritten by the checkpoint, but it also marks the tensor-parallel parameters
        # (param.tensor_model_parallel) that the gradient norm and the optimizer rely on.
        use_cpu_initialization=not on_gpu, perform_initialization=True, init_method_std=shape.init_std,
        attention_softmax_in_fp32=True, masked_softmax_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cuda_graph_scope=[],  # no CUDA graphs; the default ("full") only draws a deprecation warning
    )


def build(shape: ModelShape, config, spec, *, pre_process: bool, post_process: bool):
    """This pipeline stage's GPTModel (embedding on the first stage, final norm and output layer on the last)."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=shape.padded_vocab,
        max_sequence_length=shape.max_positions, pre_process=pre_process, post_process=post_process,
        parallel_output=True, share_embeddings_and_output_weights=shape.tied, position_embedding_type="rope",
        rotary_base=shape.rope_theta, rope_scaling=shape.rope_scaling_factor is not None,
        rope_scaling_factor=shape.rope_scaling_factor or 8.0,
    )
