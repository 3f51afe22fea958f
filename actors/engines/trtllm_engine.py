"""engine.kind=trtllm: TensorRT-LLM's LLM API (PyTorch backend) behind the Engine protocol.

This module imports nothing of TensorRT-LLM: the mapping of parameters, results and refit names is in
trtllm_mapping.py, and every call into TensorRT-LLM is in trtllm_adapter.py, imported only when an engine is
built, so this package imports and the other engines run where TensorRT-LLM is not installed.

Written against the documented API of tensorrt-llm==1.2.1 and NOT run (no machine here can install it):
docs/engines.md lists what to run first.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
from transformers import AutoConfig, AutoTokenizer

from actors.engines import EngineSpec, check_options, context_length
from actors.engines.torch_engine import _engine_stop_ids  # the checkpoint's EOS ids, read one way for both
from actors.engines.protocol import GenerationRequest, GenerationResult, WeightBucket
from actors.engines.trtllm_mapping import (BATCH_VARIANCE_WARNING, INSTALL, PACKAGE, VERSION, ModelShape,
                                           check_layout_against, checkpoint_shapes, hf_from_engine,
                                           sampled_logprobs, sampling_kwargs, score_from_logits, to_result)
from refit_wire import unpack_bucket


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
