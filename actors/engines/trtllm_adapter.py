"""Every call into TensorRT-LLM, for engine.kind=trtllm (trtllm_engine.py and trtllm_mapping.py are our side).

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
from contextlib import contextmanager
from typing import Any, Mapping, Sequence

import torch

import tensorrt_llm
from tensorrt_llm import LLM
from tensorrt_llm import SamplingParams as TrtSamplingParams
from tensorrt_llm.llmapi import KvCacheConfig

from actors.engines import EngineSpec
from actors.engines.trtllm_mapping import VERSION, check_layout_against

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
        self._raw_mode = _raw_logprobs_mode(self._fields)

    def _sampling(self, kw: Mapping[str, Any]) -> TrtSamplingParams:
        kw = dict(kw)
        if kw.pop("logprobs_mode", None) == "raw" and self._raw_mode is not None:
            kw["logprobs_mode"] = self._raw_mode
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


def _raw_logprobs_mode(fields: set[str]) -> Any:
    """VERSION-SPECIFIC: the value of SamplingParams.logprobs_mode that asks for log-probs of the unscaled
    model. Later releases have a LogprobMode enum (RAW, the default); earlier ones took the strings
    "raw_logprobs" / "processed_logprobs"; before that there was no mode (None: the field is left out)."""
    if "logprobs_mode" not in fields:
        warnings.warn("this TensorRT-LLM has no SamplingParams.logprobs_mode: its log-probs may be taken after "
                      "temperature / top-k / top-p, which the engine contract does not allow")
        return None
    from tensorrt_llm import sampling_params

    enum = getattr(sampling_params, "LogprobMode", None)
    return enum.RAW if enum is not None and hasattr(enum, "RAW") else "raw_logprobs"


@contextmanager
def _paused(worker):
    """VERSION-SPECIFIC: run a weight change or a communicator set-up while the worker's executor loop is
    parked (PyExecutor.control_action, what TensorRT-LLM's control_action_decorator wraps): no request is in
    flight and no tensor-parallel collective of the loop can interleave with ours. Releases without it run
    the call directly (the engine never refits while it generates: the replica's actor serialises them)."""
    control = getattr(worker.engine, "control_action", None)
    if control is None:
        yield
        return
    with control():
        yield


def _begin_reload(worker) -> None:
    """VERSION-SPECIFIC: the modules' pre-reload hooks, once per refit (releases that have them need them
    before the first partial load; TensorRT-LLM's own WorkerExtension.update_weights does the same)."""
    if getattr(worker, "_selfreward_reloading", False):
        return
    for module in worker.engine.model_engine.model.modules():
        if hasattr(module, "pre_reload_weights") and not getattr(module, "_weights_removed", False):
            module.pre_reload_weights()
    worker._selfreward_reloading = True


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
    """VERSION-SPECIFIC: the modules' post-load hooks (re-fusing, scales; both names, as TensorRT-LLM's own
    WorkerExtension calls them), then drop cached prefixes."""
    torch.cuda.synchronize()
    for module in worker.engine.model_engine.model.modules():
        if getattr(module, "_weights_removed", False):
            continue
        for hook in ("process_weights_after_loading", "post_load_weights"):
            if hasattr(module, hook):
                getattr(module, hook)()
    worker.engine.reset_prefix_cache()
    worker._selfreward_reloading = False


def _tp_rank(worker) -> int:
    """VERSION-SPECIFIC: the worker's tensor-parallel rank. The Ray workers initialise torch.distributed
    over the replica's ranks (NeMo-RL's NCCL extension reads the rank there too)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(getattr(worker, "rank", 0))


class _ModelSink:
    """The engine RefitReceiver sees on a worker: the layout checked against the checkpoint's parameters,
    each received bucket handed to the model's loader."""

    def __init__(self, model_engine, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.model_engine, self.shapes = model_engine, shapes

    def check_layout(self, layout) -> None:
        check_layout_against(layout, self.shapes)

    def load_flat_bucket(self, entry, data: torch.Tensor) -> None:
        from refit_wire import entry_views

        _reload(self.model_engine, entry_views(entry, data))


class RefitWorkerExtension:
    """Mixed into TensorRT-LLM's Ray workers (ray_worker_extension_cls); called by `TrtllmLLM._rpc`."""

    def selfreward_load(self, weights: Mapping[str, torch.Tensor]) -> None:
        device = torch.device("cuda", torch.cuda.current_device())
        with _paused(self):
            _begin_reload(self)
            _reload(self.engine.model_engine, {n: t.to(device, non_blocking=True) for n, t in weights.items()})

    def selfreward_finish_load(self) -> None:
        with _paused(self):
            _finish_reload(self)

    def selfreward_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.engine.model_engine.model.named_parameters()}

    def selfreward_join(self, host: str, port: int, generation: int, first_rank: int, size: int, backend: str) -> None:
        from actors.refit_receiver import RefitReceiver

        self._selfreward_refit = getattr(self, "_selfreward_refit", None) or RefitReceiver()
        with _paused(self):  # creating a communicator beside the loop's own collectives can deadlock
            self._selfreward_refit.join(host, port, generation, first_rank + _tp_rank(self), size, backend)

    def selfreward_leave(self) -> None:
        refit = getattr(self, "_selfreward_refit", None)
        if refit is not None:
            refit.leave()

    def selfreward_prepare(self, layout: list, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._selfreward_sink = _ModelSink(self.engine.model_engine, shapes)
        self._selfreward_refit.prepare(layout, self._selfreward_sink, torch.device("cuda", torch.cuda.current_device()))

    def selfreward_receive(self) -> None:
        with _paused(self):
            _begin_reload(self)
            self._selfreward_refit.receive(self._selfreward_sink)
            _finish_reload(self)
