"""Model shapes the GPU benchmarks build with random weights (their config.json fields; nothing is downloaded)."""

from __future__ import annotations

# model_type (transformers) and the config fields that set the shape.
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                         rms_norm_eps=1e-5),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                         rms_norm_eps=1e-5),
    # 30 thin layers, 9 heads / 3 KV heads (head_dim 64), tied embeddings
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                         rms_norm_eps=1e-5),
    # q/k/v bias, 14 heads / 2 KV heads (head_dim 64), tied embeddings
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
                         rms_norm_eps=1e-6),
}
LLAMA_1B = {k: v for k, v in SHAPES["llama-3.2-1b"].items() if k != "model_type"}


def hf_config(name: str, **overrides):
    """The transformers config of shape `name` (no special token ids unless given)."""
    from transformers import AutoConfig

    fields = dict(SHAPES[name])
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **{"bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
                                               **fields, **overrides})


def kv_bytes_per_token(name: str, bytes_per: int) -> int:
    c = SHAPES[name]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]) * bytes_per
