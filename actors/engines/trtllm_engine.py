"""engine.kind=trtllm: TensorRT-LLM's LLM API (PyTorch backend) behind the Engine protocol.

This module is our side of the bridge and imports nothing of TensorRT-LLM: the mapping of our sampling
parameters to TensorRT-LLM's, of its outputs to GenerationResult (stop and finish decided here, from the
tokens, exactly as the torch engine decides them), of a refit layout to the checkpoint's Hugging Face
parameters, and of TensorRT-LLM's fused (and tensor-parallel sharded) parameters back to Hugging Face
names. Every call into TensorRT-LLM is in trtllm_adapter.py, imported only when an engine is built, so this
package imports and the other engines run where TensorRT-LLM is not installed.

Written against the documented API of tensorrt-llm==1.2.1 and NOT run (no machine here can install it):
docs/engines.md lists what to run first.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from actors.engines import EngineSpec, check_options, context_length
from actors.engines.torch_engine import _engine_stop_ids  # the checkpoint's EOS ids, read one way for both
from actors.engines.protocol import GenerationRequest, GenerationResult, SamplingParams, WeightBucket
from refit_wire import layout_spans, unpack_bucket

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


# --------------------------------------------------------------------------------------------- engine


class TrtllmEngine:
    """The Engine protocol over one TensorRT-LLM LLM (one replica; `tensor_parallel` ranks inside it)."""

    # What EngineSpec.options may set for trtllm, with the values each takes.
    OPTIONS = {
        "enable_chunked_prefill": (lambda v: type(v) is bool, "true or false"),
        "cuda_graphs": (lambda v: type(v) is bool, "true or false"),
    }
    REQUIRES = (PACKAGE, INSTALL)  # actors.engines.engine_class refuses the kind when it does not import
    START_WARNING = BATCH_VARIANCE_WARNING  # logged by orchestration.cluster.start_pools, warned by each engine
    BATCH_INVARIANT = False  # checkpoint.record_rollouts=auto turns the rollout journal on for this engine

    @classmethod
    def check_spec(cls, spec: EngineSpec) -> None:
        if importlib.util.find_spec(PACKAGE) is None:
            raise ImportError(f"engine.kind=trtllm needs TensorRT-LLM {VERSION}, which is not installed: {INSTALL}",
                              name=PACKAGE)
        check_options(spec, cls.OPTIONS)
        for key, value in spec.options.items():
            valid, wanted = cls.OPTIONS[key]
            if not valid(value):
                raise ValueError(f"engine.options.{key} must be {wanted}, got {value!r}")
        if spec.kv_cache_memory_gb is not None:  # TensorRT-LLM sizes its cache by a share of free memory
            raise ValueError(f"engine.kv_cache_memory_gb={spec.kv_cache_memory_gb} is not taken by the trtllm "
                             "engine: set engine.gpu_memory_fraction (its share of free GPU memory) instead")

    @staticmethod
    def bundle_env(bundles: list[int]) -> dict[str, str]:
        """The host actor's environment that places TensorRT-LLM's rank workers (one per tensor-parallel rank)
        in `bundles` of the placement group the host runs in (orchestration/cluster.py gives each replica
        tensor_parallel consecutive bundles of one GPU, and the host nothing). TensorRT-LLM's Ray executor
        hands the host's environment on to its workers."""
        return {"TRTLLM_RAY_BUNDLE_INDICES": ",".join(str(b) for b in bundles), "TRTLLM_RAY_PER_WORKER_GPUS": "1",
                # The model loader copies on the caller's stream (no thread pool): a refit bucket's views are
                # read before its receive buffer is reused (NeMo-RL's TensorRT-LLM extension sets it too).
                "TRT_LLM_DISABLE_LOAD_WEIGHTS_IN_PARALLEL": "True"}

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> "TrtllmEngine":
        cls.check_spec(spec)
        return cls(spec)

    def __init__(self, spec: EngineSpec) -> None:
        from actors.engines import trtllm_adapter  # the only import of TensorRT-LLM

        warnings.warn(BATCH_VARIANCE_WARNING, stacklevel=2)
        self.spec = spec
        self.max_seq_len = context_length(spec.model_dir, spec.max_seq_len)
        self.max_batch_size = spec.max_batch_size
        self.weight_version = spec.weight_version
        config = json.loads((Path(spec.model_dir) / "config.json").read_text())
        self.model_shape = ModelShape.from_config(config)
        self.vocab_size = int(config["vocab_size"])
        self.shapes = checkpoint_shapes(spec.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
        self.stop_token_ids = sorted(_engine_stop_ids(Path(spec.model_dir), AutoConfig.from_pretrained(spec.model_dir),
                                                      self.tokenizer))
        self.llm = trtllm_adapter.TrtllmLLM(spec, self.max_seq_len)
        self._load_pending = False  # buckets loaded whose post-load step has not run yet

    # -------------------------------------------------------------------------------------- generate

    def _check_tokens(self, ids: Sequence[int], limit: int) -> None:
        if len(ids) == 0:
            raise ValueError("empty token sequence")
        if len(ids) > limit:
            raise ValueError(f"sequence of {len(ids)} tokens exceeds the limit of {limit} (max_seq_len={self.max_seq_len})")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{min(ids)}, {max(ids)}]")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        for r in requests:  # every request checked before any work (the protocol)
            self._check_tokens(r.prompt_ids, self.max_seq_len - 1)
            p = r.sampling
            if p.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {p.max_new_tokens}")
            if p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0:
                raise ValueError(f"invalid sampling params: temperature={p.temperature}, top_p={p.top_p}, top_k={p.top_k}")
        if not requests:
            return []
        kwargs = [sampling_kwargs(r.sampling, r.seed, len(r.prompt_ids), self.max_seq_len, self.stop_token_ids)
                  for r in requests]
        self._finish_pending()
        outputs = self.llm.generate([list(r.prompt_ids) for r in requests], kwargs)
        results = []
        for r, (tokens, logprobs) in zip(requests, outputs):
            lps = sampled_logprobs(tokens, logprobs) if r.sampling.return_logprobs else None
            results.append(to_result(tokens, lps, r.sampling, self.stop_token_ids, self.weight_version,
                                     self.tokenizer.decode))
        return results

    def score(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> list[list[float]]:
        if len(sequences) != len(prompt_lens):
            raise ValueError(f"{len(sequences)} sequences but {len(prompt_lens)} prompt_lens")
        for seq, p in zip(sequences, prompt_lens):
            self._check_tokens(seq, self.max_seq_len)
            if not 1 <= p <= len(seq):
                raise ValueError(f"prompt_len {p} must be in [1, {len(seq)}] (the first token has no context)")
        self._finish_pending()
        logits = self.llm.context_logits([list(s) for s in sequences])
        return [score_from_logits(lg, s, p) for lg, s, p in zip(logits, sequences, prompt_lens)]

    # --------------------------------------------------------------------------------------- weights

    def check_layout(self, layout: Sequence[Mapping]) -> None:
        check_layout_against(layout, self.shapes)

    def load_weights(self, buckets: Sequence[WeightBucket], version: int) -> None:
        """Validate every bucket first (nothing changes on a bad refit), then hand TensorRT-LLM the named
        tensors (Hugging Face names: its loader fuses and shards them)."""
        self.check_layout([{**vars(b), "nbytes": b.data.size} for b in buckets])
        for bucket in buckets:
            self.llm.update_weights(unpack_bucket(bucket))
        self._load_pending = True
        self._finish_pending()
        self.weight_version = version

    def load_flat_bucket(self, entry: Mapping, data: torch.Tensor) -> None:
        """One received bucket into every rank. TensorRT-LLM's post-load step runs once, before the engine
        next serves (`_finish_pending`), not per bucket."""
        from refit_wire import entry_views

        self.llm.update_weights(entry_views(entry, data))
        self._load_pending = True

    def _finish_pending(self) -> None:
        if self._load_pending:
            self.llm.finish_weight_update()
            self._load_pending = False

    def named_parameters_hf(self) -> dict[str, torch.Tensor]:
        self._finish_pending()
        return hf_from_engine(self.llm.rank_parameters(), self.model_shape)

    def refit_receiver(self) -> "TrtllmRefit":
        """The collective refit lands in the engine's workers, one rank each (EngineHost asks for this)."""
        return TrtllmRefit(self)


class TrtllmRefit:
    """RefitReceiver's interface for an engine whose tensor-parallel workers are the refit group's ranks
    `first_rank .. first_rank + tensor_parallel - 1`: each worker receives every bucket from the source and
    hands it to its model's loader, which takes its shard (trtllm_adapter.RefitWorkerExtension)."""

    def __init__(self, engine: TrtllmEngine) -> None:
        self.engine = engine
        self.generation = 0

    def join(self, host: str, port: int, generation: int, rank: int, size: int, backend: str) -> None:
        if rank + self.engine.spec.tensor_parallel > size:
            raise ValueError(f"refit ranks {rank}..{rank + self.engine.spec.tensor_parallel - 1} do not fit a "
                             f"group of {size}: the orchestrator must give a replica one rank per GPU")
        self.engine.llm.join_refit_group(host, port, generation, rank, size, backend)
        self.generation = generation

    def leave(self) -> None:
        if self.generation:
            self.engine.llm.leave_refit_group()
        self.generation = 0

    def prepare(self, layout: Sequence[Mapping], engine: TrtllmEngine, device: torch.device) -> None:
        if not layout:
            raise ValueError("empty refit layout")
        engine.check_layout(layout)
        engine.llm.prepare_refit(list(layout), engine.shapes)

    def receive(self, engine: TrtllmEngine) -> None:
        engine.llm.receive_refit()
