"""Weights between Hugging Face names and megatron-core's GPTModel layout, in both directions.

A `Rule` ties one megatron parameter (named as in an unsplit model: global layer index, tensor-parallel
size 1) to the Hugging Face tensors it is made of:

- `copy`: the same tensor (norms, o_proj/down_proj, untied lm_head) or, for the embedding and output layer,
  the same rows plus zero rows up to the padded vocabulary;
- `qkv`: q, k and v fused per key-value group: group g holds its `heads_per_group` query heads, then its key
  head, then its value head (weights and, for Qwen2, biases);
- `gate_up`: gate_proj stacked on up_proj in the first MLP weight (megatron's gated linear unit splits it in
  two halves).

Norm names follow the layer spec: the local spec has `input_layernorm` / `pre_mlp_layernorm`, Transformer
Engine fuses them into the next linear layer as `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`.
`shard` and `unshard` go between the unsplit tensor and one tensor-parallel rank's slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .model import ModelShape

HF_PREFIX = "model.layers."


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    kind: str  # copy | qkv | gate_up | vocab
    tp_dim: int | None  # dimension split over tensor-parallel ranks; None = replicated
    layer: int | None  # global layer index; None = embedding / final norm / output layer


def rules(shape: ModelShape, transformer_engine: bool) -> list[Rule]:
    """Every megatron parameter of the whole model, in Hugging Face state-dict order."""
    out = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0, None)]
    for i in range(shape.layers):
        hf, mg = f"{HF_PREFIX}{i}.", f"decoder.layers.{i}."
        qkv = tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv")
        out.append(Rule(f"{mg}self_attention.linear_qkv.weight", qkv, "qkv", 0, i))
        if shape.qkv_bias:
            out.append(Rule(f"{mg}self_attention.linear_qkv.bias",
                            tuple(f"{hf}self_attn.{p}_proj.bias" for p in "qkv"), "qkv", 0, i))
        out.append(Rule(f"{mg}self_attention.linear_proj.weight", (f"{hf}self_attn.o_proj.weight",), "copy", 1, i))
        out.append(Rule(f"{mg}mlp.linear_fc1.weight", (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"),
                        "gate_up", 0, i))
        out.append(Rule(f"{mg}mlp.linear_fc2.weight", (f"{hf}mlp.down_proj.weight",), "copy", 1, i))
        attn_norm = "self_attention.linear_qkv.layer_norm_weight" if transformer_engine else "input_layernorm.weight"
        mlp_norm = "mlp.linear_fc1.layer_norm_weight" if transformer_engine else "pre_mlp_layernorm.weight"
        out.append(Rule(f"{mg}{attn_norm}", (f"{hf}input_layernorm.weight",), "copy", None, i))
        out.append(Rule(f"{mg}{mlp_norm}", (f"{hf}post_attention_layernorm.weight",), "copy", None, i))
    out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", None, None))
    if not shape.tied:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab", 0, None))
    return out


def to_megatron(rule: Rule, hf: Callable[[str], torch.Tensor], shape: ModelShape) -> torch.Tensor:
    """The unsplit megatron tensor of `rule`, from a getter of Hugging Face tensors."""
    parts = [hf(name) for name in rule.hf]
    if rule.kind == "copy":
        return parts[0]
    if rule.kind == "vocab":
        weight = parts[0]
        pad = shape.padded_vocab - weight.shape[0]
        return torch.cat([weight, weight.new_zeros(pad, *weight.shape[1:])]) if pad else weight
    if rule.kind == "gate_up":
        return torch.cat(parts, dim=0)
    q, k, v = parts  # qkv: [groups, heads_per_group + 2, head_dim, (hidden)]
    groups, per, hd = shape.kv_heads, shape.heads_per_group, shape.head_dim
    trailing = q.shape[1:]
    fused = torch.cat([q.reshape(groups, per, hd, *trailing), k.reshape(groups, 1, hd, *trailing),
                       v.reshape(groups, 1, hd, *trailing)], dim=1)
    return fused.reshape(groups * (per + 2) * hd, *trailing)


def to_hf(rule: Rule, tensor: torch.Tensor, shape: ModelShape) -> list[tuple[str, torch.Tensor]]:
    """The Hugging Face tensors of `rule` from its unsplit megatron tensor (views where possible)."""
    if rule.kind == "copy":
        return [(rule.hf[0], tensor)]
    if rule.kind == "vocab":
        return [(rule.hf[0], tensor[: shape.vocab])]
    if rule.kind == "gate_up":
        gate, up = tensor.chunk(2, dim=0)
        return [(rule.hf[0], gate), (rule.hf[1], up)]
    groups, per, hd = shape.kv_heads, shape.heads_per_group, shape.head_dim
    trailing = tensor.shape[1:]
    fused = tensor.reshape(groups, per + 2, hd, *trailing)
    q = fused[:, :per].reshape(groups * per * hd, *trailing)
    k = fused[:, per].reshape(groups * hd, *trailing)
    v = fused[:, per + 1].reshape(groups * hd, *trailing)
    return list(zip(rule.hf, (q, k, v)))


def shard(rule: Rule, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Tensor-parallel rank `rank`'s slice of an unsplit megatron tensor."""
    if rule.tp_dim is None or size == 1:
        return tensor
    if rule.kind == "gate_up":  # each rank holds its slice of gate, then its slice of up
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return tensor.chunk(size, dim=rule.tp_dim)[rank]


def unshard(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """The unsplit megatron tensor from every tensor-parallel rank's slice (in rank order)."""
    if rule.tp_dim is None or len(shards) == 1:
        return shards[0]
    if rule.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=rule.tp_dim)


def hf_to_megatron(hf_state: dict[str, torch.Tensor], shape: ModelShape,
                   transformer_engine: bool = False) -> dict[str, torch.Tensor]:
    """A whole Hugging Face state dict in the unsplit megatron layout."""
    return {r.megatron: to_megatron(r, hf_state.__getitem__, shape) for r in rules(shape, transformer_engine)}


def megatron_to_hf(state: dict[str, torch.Tensor], shape: ModelShape,
                   transformer_engine: bool = False) -> dict[str, torch.Tensor]:
    """A whole unsplit megatron state dict under Hugging Face names (lm_head omitted when tied)."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules(shape, transformer_engine):
        out.update(to_hf(rule, state[rule.megatron], shape))
    return out


def owner_stage(rule: Rule, shape: ModelShape, pipeline_parallel: int) -> int:
    """The pipeline stage that exports the parameter (a tied embedding's copy on the last stage is not exported)."""
    if rule.layer is not None:
        return rule.layer // (shape.layers // pipeline_parallel)
    return 0 if rule.megatron.startswith("embedding.") else pipeline_parallel - 1


def local_name(rule: Rule, layer_offset: int) -> str:
    """The parameter's name inside a pipeline stage whose first layer has global index `layer_offset`."""
    if rule.layer is None:
        return rule.megatron
    prefix = f"decoder.layers.{rule.layer}."
    return f"decoder.layers.{rule.layer - layer_offset}." + rule.megatron[len(prefix):]
