"""engine.kind=trtllm, our side of the mapping, importing nothing of TensorRT-LLM: the version pinned, our
sampling parameters to TensorRT-LLM's, its outputs to GenerationResult (stop and finish decided here, from
the tokens, exactly as the torch engine decides them), a refit layout checked against the checkpoint's
Hugging Face parameters, and TensorRT-LLM's fused (and tensor-parallel sharded) parameters back to Hugging
Face names. The engine (trtllm_engine.py) and the adapter that calls TensorRT-LLM (trtllm_adapter.py) both
use it; it imports neither.

Written against the documented API of tensorrt-llm==1.2.1 and NOT run (no machine here can install it):
docs/engines.md lists what to run first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import safe_open

from actors.engines.protocol import GenerationResult, SamplingParams
from refit_wire import layout_spans

PACKAGE = "tensorrt_llm"
VERSION = "1.2.1"  # the one version the adapter was written against (pyproject's `trtllm` extra)
# PyPI's tensorrt-llm is a stub that downloads the wheel from NVIDIA's index at install time.
INSTALL = "pip install 'selfreward[trtllm]' --extra-index-url https://pypi.nvidia.com"

BATCH_VARIANCE_WARNING = (
    "engine.kind=trtllm: TensorRT-LLM does not promise that a sampled request's tokens depend only on its seed "
    "(batch composition and scheduling may change them). Greedy requests are unaffected. The run records what "
    "the pools return before using it (checkpoint.record_rollouts=auto), so a resumed run replays the calls "
    "the stopped one had made instead of sampling them again (docs/engines.md).")


# ------------------------------------------------------------------------------------- sampling


def sampling_kwargs(params: SamplingParams, seed: int, prompt_len: int, max_seq_len: int,
                    stop_ids: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of tensorrt_llm.SamplingParams for one request.

    - greedy (temperature 0) is top_k=1 (TensorRT-LLM's documented greedy), temperature left unset;
    - top_k 0 (ours: no filter) is None (theirs: unset); top_p 1 likewise;
    - max_tokens is capped so prompt plus generated tokens never pass max_seq_len (ours: "length");
    - every stop id (the checkpoint's EOS / end-of-turn ids and the request's) goes to stop_token_ids, and
      ignore_eos turns off TensorRT-LLM's own end_id handling (which may drop the EOS token from the
      output), so one rule decides stops; stop strings are
      passed too (generation ends early) with include_stop_str_in_output, so the stop tokens stay in the
      output: `to_result` cuts and decides the finish reason itself;
    - logprobs=1 with the RAW mode asks for each sampled token's log-prob under the unscaled model.
    """
    room = max_seq_len - prompt_len
    if room < 1:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room in max_seq_len={max_seq_len}")
    kwargs: dict[str, Any] = {
        "max_tokens": min(params.max_new_tokens, room),
        "ignore_eos": True,
        "stop_token_ids": sorted(set(stop_ids) | set(params.stop_token_ids)),
        "include_stop_str_in_output": True,
        "seed": int(seed),
        "detokenize": bool(params.stop_strings),  # stop strings are matched on text; otherwise skip the work
    }
    if params.stop_strings:
        kwargs["stop"] = list(params.stop_strings)
    if params.temperature == 0:
        kwargs["top_k"] = 1
    else:
        kwargs["temperature"] = float(params.temperature)
        if params.top_k:
            kwargs["top_k"] = int(params.top_k)
        if params.top_p < 1:
            kwargs["top_p"] = float(params.top_p)
    if params.return_logprobs:
        kwargs["logprobs"] = 1
        kwargs["logprobs_mode"] = "raw"
    return kwargs


def sampled_logprobs(token_ids: Sequence[int], logprobs: Sequence[Any] | None) -> list[float] | None:
    """The log-prob of each generated token from TensorRT-LLM's CompletionOutput.logprobs: one entry per
    token, a float or a {token_id: Logprob(logprob=...)} dict (top-k plus the sampled token)."""
    if logprobs is None:
        return None
    if len(logprobs) < len(token_ids):
        raise ValueError(f"TensorRT-LLM returned {len(logprobs)} log-probs for {len(token_ids)} tokens")
    out = []
    for i, (token, entry) in enumerate(zip(token_ids, logprobs)):
        if isinstance(entry, Mapping):
            if token not in entry:
                raise ValueError(f"TensorRT-LLM's log-probs of token {i} do not include the sampled token {token}")
            entry = entry[token]
        out.append(float(getattr(entry, "logprob", entry)))
    return out


def to_result(token_ids: Sequence[int], logprobs: list[float] | None, params: SamplingParams,
              stop_ids: Sequence[int], weight_version: int, decode: Callable[[list[int]], str]) -> GenerationResult:
    """Our result from TensorRT-LLM's tokens: cut after the first stop token or at the first token whose
    text completes a stop string, whichever comes first; "stop" if cut, else "length". TensorRT-LLM's own
    finish_reason is not used: with ignore_eos and the stop strings kept in the output its tokens carry
    everything, and one rule for every engine keeps them comparable."""
    tokens = [int(t) for t in token_ids]
    stops = set(stop_ids) | set(params.stop_token_ids)
    window = max((len(s.encode("utf-8")) for s in params.stop_strings), default=0) + 2  # as the torch engine
    cut, stop_text = None, None
    for j in range(1, len(tokens) + 1):
        if tokens[j - 1] in stops:
            cut = j
            break
        if params.stop_strings:
            text = decode(tokens[max(0, j - window) : j])
            hits = [(text.find(s), s) for s in params.stop_strings if s in text]
            if hits:
                cut, stop_text = j, min(hits)[1]
                break
    kept = tokens if cut is None else tokens[:cut]
    return GenerationResult(
        token_ids=kept,
        finish_reason="stop" if cut is not None else "length",
        weight_version=weight_version,
        logprobs=None if logprobs is None else logprobs[: len(kept)],
        stop_text=stop_text,
    )


def score_from_logits(logits: torch.Tensor, sequence: Sequence[int], prompt_len: int) -> list[float]:
    """Log-probs of sequence[prompt_len:] from the context logits [len(sequence), vocab] of a prefill of the
    whole sequence (row t predicts token t + 1), in float32."""
    if logits.shape[0] < len(sequence) - 1:
        raise ValueError(f"{logits.shape[0]} context logits for a sequence of {len(sequence)} tokens")
    rows = logits[prompt_len - 1 : len(sequence) - 1].float().log_softmax(-1)
    targets = torch.as_tensor(list(sequence[prompt_len:]), dtype=torch.int64, device=rows.device)
    return rows.gather(1, targets[:, None])[:, 0].tolist()


# ----------------------------------------------------------------------------- refit: names and layouts


@dataclass(frozen=True)
class ModelShape:
    """What the name mapping needs of the checkpoint's config."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelShape":
        heads = config["num_attention_heads"]
        return cls(heads, config.get("num_key_value_heads", heads),
                   config.get("head_dim") or config["hidden_size"] // heads,
                   config["intermediate_size"], bool(config.get("tie_word_embeddings", False)))


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """The Hugging Face parameters a refit must set, with their shapes, from the checkpoint's safetensors
    headers (no tensor is read): what TensorRT-LLM loaded, less rope buffers and a tied lm_head copy."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    index = model_dir / "model.safetensors.index.json"
    files = ([model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
             if index.exists() else sorted(model_dir.glob("*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tied_copy = name == "lm_head.weight" and config.get("tie_word_embeddings", False)
                if not (tied_copy or name.endswith("rotary_emb.inv_freq")):
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_layout_against(layout: Sequence[Mapping], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The protocol's check_layout over `shapes` (name -> shape): every parameter exactly once, with its
    shape, each entry inside its bucket and aligned (refit_wire.layout_spans)."""
    seen: set[str] = set()
    for bucket in layout:
        for name, _, shape, _, _ in layout_spans(bucket, bucket["nbytes"]):
            if name not in shapes:
                hint = " (embeddings are tied: send model.embed_tokens.weight only)" if name == "lm_head.weight" else ""
                raise ValueError(f"unknown parameter {name!r}{hint}")
            if name in seen:
                raise ValueError(f"parameter {name!r} is set more than once")
            if tuple(shape) != shapes[name]:
                raise ValueError(f"parameter {name!r} has shape {tuple(shape)}, expected {shapes[name]}")
            seen.add(name)
    missing = sorted(set(shapes) - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"missing parameters: {missing[:5]}{more}")


# How TensorRT-LLM's PyTorch Llama/Qwen2/Mistral modules hold the Hugging Face parameters: q/k/v fused in
# qkv_proj and gate/up in gate_up_proj (concatenated on dim 0, per tensor-parallel rank), column-parallel
# linears split on dim 0 and row-parallel ones on dim 1 across ranks; norms replicated.
_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
_ROW_PARALLEL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def _fused_split(name: str, shape: ModelShape, tp: int) -> tuple[str, list[str], list[int]] | None:
    """(fused module suffix, the Hugging Face names, their per-rank sizes on dim 0) for a fused parameter."""
    for fused, parts in _FUSED.items():
        marker = f".{fused}."
        if marker in name:
            prefix, leaf = name.split(marker)
            if fused == "self_attn.qkv_proj":
                q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
                # A k/v head is replicated when there are fewer kv heads than ranks.
                sizes = [q // tp, max(kv // tp, shape.head_dim), max(kv // tp, shape.head_dim)]
            else:
                sizes = [shape.intermediate_size // tp] * 2
            return fused, [f"{prefix}.{p}.{leaf}" for p in parts], sizes
    return None


def hf_from_engine(shards: Sequence[Mapping[str, torch.Tensor]], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Hugging Face parameters from the engine's parameters on each tensor-parallel rank (rank order): fused
    tensors split, column-parallel shards joined on dim 0, row-parallel ones on dim 1, replicated ones
    (norms, biases of row-parallel linears) taken from rank 0. With more ranks than kv heads a kv head is
    held by several ranks: each is taken once."""
    tp = len(shards)
    out: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        per_rank = [s[name] for s in shards]
        fused = _fused_split(name, shape, tp)
        if fused is not None:
            _, names, sizes = fused
            pieces = [torch.split(t, sizes, dim=0) for t in per_rank]
            for j, hf in enumerate(names):
                parts = [p[j] for p in pieces]
                if j > 0 and fused[0] == "self_attn.qkv_proj" and shape.num_kv_heads < tp:
                    parts = parts[:: tp // shape.num_kv_heads]  # each kv head once
                out[hf] = torch.cat(parts, dim=0)
        elif tp == 1 or name.endswith("norm.weight") or (name.endswith(".bias") and any(
                name.endswith(r[: -len("weight")] + "bias") for r in _ROW_PARALLEL)):
            out[name] = per_rank[0]
        elif any(name.endswith(r) for r in _ROW_PARALLEL):
            out[name] = torch.cat(per_rank, dim=1)
        else:  # column-parallel: embeddings, lm_head
            out[name] = torch.cat(per_rank, dim=0)
    if shape.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out
