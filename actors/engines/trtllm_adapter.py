"""Every call into TensorRT-LLM, for engine.kind=trtllm (actors/engines/trtllm_engine.py is our side).

Written against the documented API of tensorrt-llm==1.2.1 (the LLM API with the PyTorch backend and the
Ray orchestrator, `LLM._collective_rpc`, a `ray_worker_extension_cls`) and NOT run: no machine of this
project can install TensorRT-LLM. The refit API has changed between releases; the calls that differ are
the helpers marked VERSION-SPECIFIC below, and nothing outside this module touches TensorRT-LLM.

Layout: the replica's Ray actor (actors/engine_host.py) owns one `LLM`. With orchestrator_type="ray"
TensorRT-LLM starts one worker actor per tensor-parallel rank; `RefitWorkerExtension` adds our methods to
those workers: loading Hugging Face-named tensors, exporting parameters, and the collective refit, where
every worker is a rank of our refit group (refit_wire) and lands each flat bucket in its model itself.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch

import tensorrt_llm
from tensorrt_llm import LLM
from tensorrt_llm import SamplingParams as TrtSamplingParams
from tensorrt_llm.llmapi import KvCacheConfig

from actors.engines import EngineSpec
from actors.engines.trtllm_engine import VERSION

EXTENSION = "actors.engines.trtllm_adapter.RefitWorkerExtension"


class TrtllmLLM:
    """One TensorRT-LLM LLM and the few calls the engine makes of it."""

    def __init__(self, spec: EngineSpec, max_seq_len: int) -> None:
        if tensorrt_llm.__version__ != VERSION:
            warnings.warn(f"tensorrt_llm {tensorrt_llm.__version__} is installed; the trtllm engine was written "
                          f"for {VERSION} (its refit calls differ between releases: trtllm_adapter.py)")
        options = dict(spec.options)
        # Prefix reuse is off: a refit changes the weights under cached blocks.
        kv = KvCacheConfig(free_gpu_memory_fraction=spec.gpu_memory_fraction, enable_block_reuse=False)
        kwargs: dict[str, Any] = {}
        if not options.get("cuda_graphs", True):
            kwargs["cuda_graph_config"] = None
        self.llm = LLM(
            model=spec.model_dir,
            backend="pytorch",
            dtype=spec.dtype,
            tensor_parallel_size=spec.tensor_parallel,
            max_batch_size=spec.max_batch_size,
            # One more position than we serve: `score` prefills a whole max_seq_len sequence and TensorRT-LLM
            # wants room for one generated token after it. generate caps max_tokens at max_seq_len itself.
            max_seq_len=max_seq_len + 1,
            kv_cache_config=kv,
            enable_chunked_prefill=options.get("enable_chunked_prefill", False),
            orchestrator_type="ray",  # _collective_rpc (refits, exports) needs the Ray executor
            ray_worker_extension_cls=EXTENSION,
            **kwargs,
        )
        self._fields = set(getattr(TrtSamplingParams, "__dataclass_fields__", {}))

    def _sampling(self, kw: Mapping[str, Any]) -> TrtSamplingParams:
        kw = dict(kw)
        if "logprobs_mode" in kw:  # VERSION-SPECIFIC: the mode is a string enum in 1.2; absent before
            if "logprobs_mode" not in self._fields:
                kw.pop("logprobs_mode")
                warnings.warn("this TensorRT-LLM has no logprobs_mode: its log-probs may be after temperature")
        return TrtSamplingParams(**kw)

    def generate(self, prompts: Sequence[list[int]], kwargs: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], Any]]:
        """(token_ids, logprobs) of each prompt's one completion, in order."""
        outs = self.llm.generate(list(prompts), sampling_params=[self._sampling(k) for k in kwargs], use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]

    def context_logits(self, sequences: Sequence[list[int]]) -> list[torch.Tensor]:
        """The prefill logits [len, vocab] of each sequence (one throwaway greedy token is generated)."""
        params = self._sampling({"max_tokens": 1, "top_k": 1, "return_context_logits": True, "detokenize": False})
        outs = self.llm.generate(list(sequences), sampling_params=[params] * len(sequences), use_tqdm=False)
        return [o.context_logits for o in outs]

    # ------------------------------------------------------------------------------------------ refit

    def _rpc(self, method: str, *args) -> list:
        return self.llm._collective_rpc(method, args=args)  # VERSION-SPECIFIC: prototype API in 1.2

    def update_weights(self, named: Mapping[str, torch.Tensor]) -> None:
        """Hugging Face-named tensors into every rank (each rank's loader takes its shard)."""
        self._rpc("selfreward_load", {n: t.detach().cpu().contiguous() for n, t in named.items()})

    def finish_weight_update(self) -> None:
        self._rpc("selfreward_finish_load")

    def rank_parameters(self) -> list[dict[str, torch.Tensor]]:
        return self._rpc("selfreward_parameters")

    def join_refit_group(self, host: str, port: int, generation: int, first_rank: int, size: int, backend: str) -> None:
        self._rpc("selfreward_join", host, port, generation, first_rank, size, backend)

    def leave_refit_group(self) -> None:
        self._rpc("selfreward_leave")

    def prepare_refit(self, layout: list, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._rpc("selfreward_prepare", layout, dict(shapes))

    def receive_refit(self) -> None:
        self._rpc("selfreward_receive")


# ------------------------------------------------------------------------------------ worker side


def _reload(model_engine, weights: Mapping[str, torch.Tensor]) -> None:
    """VERSION-SPECIFIC: Hugging Face-named tensors into the running model. 1.2 has the model loader's
    `reload` (partial loads allowed: a refit arrives bucket by bucket); older releases only
    `model.load_weights`, which wants every tensor at once."""
    loader = getattr(model_engine, "model_loader", None)
    if loader is not None and hasattr(loader, "reload"):
        loader.reload(model_engine.model, dict(weights), allow_partial_loading=True)
    else:
        model_engine.model.load_weights(dict(weights))


def _finish_reload(worker) -> None:
    """VERSION-SPECIFIC: the modules' post-load hooks (re-fusing, scales), then drop cached prefixes."""
    for module in worker.engine.model_engine.model.modules():
        if hasattr(module, "post_load_weights") and not getattr(module, "_weights_removed", False):
            module.post_load_weights()
    worker.engine.reset_prefix_cache()


def _tp_rank(worker) -> int:
    """VERSION-SPECIFIC: the worker's tensor-parallel rank (the Ray workers initialise torch.distributed)."""
    rank = getattr(worker, "rank", None)
    return int(rank) if rank is not None else torch.distributed.get_rank()


class _ModelSink:
    """The engine RefitReceiver sees on a worker: the layout checked against the checkpoint's parameters,
    each received bucket handed to the model's loader."""

    def __init__(self, model_engine, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.model_engine, self.shapes = model_engine, shapes

    def check_layout(self, layout) -> None:
        from actors.engines.trtllm_engine import check_layout_against

        check_layout_against(layout, self.shapes)

    def load_flat_bucket(self, entry, data: torch.Tensor) -> None:
        from refit_wire import entry_views

        _reload(self.model_engine, entry_views(entry, data))


class RefitWorkerExtension:
    """Mixed into TensorRT-LLM's Ray workers (ray_worker_extension_cls); called by `TrtllmLLM._rpc`."""

    def selfreward_load(self, weights: Mapping[str, torch.Tensor]) -> None:
        device = torch.device("cuda", torch.cuda.current_device())
        _reload(self.engine.model_engine, {n: t.to(device, non_blocking=True) for n, t in weights.items()})

    def selfreward_finish_load(self) -> None:
        torch.cuda.synchronize()
        _finish_reload(self)

    def selfreward_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.engine.model_engine.model.named_parameters()}

    def selfreward_join(self, host: str, port: int, generation: int, first_rank: int, size: int, backend: str) -> None:
        from actors.refit_receiver import RefitReceiver

        self._selfreward_refit = getattr(self, "_selfreward_refit", None) or RefitReceiver()
        self._selfreward_refit.join(host, port, generation, first_rank + _tp_rank(self), size, backend)

    def selfreward_leave(self) -> None:
        refit = getattr(self, "_selfreward_refit", None)
        if refit is not None:
            refit.leave()

    def selfreward_prepare(self, layout: list, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._selfreward_sink = _ModelSink(self.engine.model_engine, shapes)
        self._selfreward_refit.prepare(layout, self._selfreward_sink, torch.device("cuda", torch.cuda.current_device()))

    def selfreward_receive(self) -> None:
        self._selfreward_refit.receive(self._selfreward_sink)
        torch.cuda.synchronize()
        _finish_reload(self)
