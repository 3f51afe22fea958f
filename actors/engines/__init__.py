"""Inference engines behind one protocol (protocol.py), built from an `EngineSpec` through a registry.

A new engine is one module with a class that satisfies `Engine` (including `from_spec`) plus one line in
`ENGINES`; tests/test_engine_contract.py then holds it to the same behaviour as the others.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .protocol import Engine

# engine.kind -> "module:Class". Import strings, not classes: an engine whose package (say tensorrt_llm) is
# not installed must not break importing this package or building the other engines.
ENGINES: dict[str, str] = {
    "torch": "actors.engines.torch_engine:TorchEngine",
    "trtllm": "actors.engines.trtllm_engine:TrtllmEngine",  # TensorRT-LLM: pip install 'selfreward[trtllm]'
}

# Default context cap (tokens) when the spec asks for none. Engines preallocate a KV cache for every slot at
# the full context, so a model's whole window (128k positions for Llama 3.x) would reserve memory for
# lengths that prompts plus responses in these algorithms never reach.
DEFAULT_MAX_CONTEXT = 4096

# The KV-cache memory budget of one engine replica (kv_cache.cache_budget resolves it to bytes). On CUDA a
# fraction of the device's total memory: generator, judge and learner may share one GPU (the one-GPU layout),
# so each engine's cache is bounded to a share that leaves room for the other two and for the weights. On CPU
# an absolute size: two engines' caches plus the learner fit a 24 GB machine.
DEFAULT_CPU_KV_CACHE_GB = 2.0
DEFAULT_GPU_MEMORY_FRACTION = 0.3


@dataclass(frozen=True)
class EngineSpec:
    """What an engine replica is built from (plain data: it travels to Ray actors)."""

    model_dir: str  # a Hugging Face checkpoint directory
    kind: str = "torch"  # a key of ENGINES
    device: str = "cpu"
    dtype: str = "float32"
    max_batch_size: int = 64
    max_seq_len: int | None = None  # the context (prompt + generated tokens); None: see context_length
    torch_threads: int = 1  # CPU threads per replica; several replicas share the machine's cores
    weight_version: int = 0  # the version the weights in model_dir are (a resumed run starts above 0)
    # KV-cache budget: slots (sequences at once) = min(max_batch_size, budget // bytes of one full-context
    # slot). kv_cache_memory_gb (1 GB = 1e9 bytes) wins on any device when set; None: the device's default,
    # gpu_memory_fraction of the GPU's total memory on CUDA, DEFAULT_CPU_KV_CACHE_GB elsewhere.
    kv_cache_memory_gb: float | None = None
    gpu_memory_fraction: float = DEFAULT_GPU_MEMORY_FRACTION
    tensor_parallel: int = 1  # GPUs (ranks) inside one replica; engines that run on one refuse more
    # Engine-specific settings (for torch: max_prefill_tokens, cuda_graphs, decode_kernel), checked by the
    # engine: a key it does not take is an error, not silently ignored.
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        gb, fraction = self.kv_cache_memory_gb, self.gpu_memory_fraction
        if gb is not None and (isinstance(gb, bool) or not isinstance(gb, (int, float)) or not gb > 0):
            raise ValueError(f"engine.kv_cache_memory_gb must be > 0 (GB) or null (the device's default), got {gb!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"engine.gpu_memory_fraction must be in (0, 1], got {fraction!r}")
        if type(self.tensor_parallel) is not int or self.tensor_parallel < 1:
            raise ValueError(f"engine.tensor_parallel must be a positive integer, got {self.tensor_parallel!r}")


def context_length(model_dir: str, requested: int | None) -> int:
    """The context an engine serves for the checkpoint in `model_dir`: `requested` (model.max_seq_len) when
    set, otherwise the model's max_position_embeddings capped at DEFAULT_MAX_CONTEXT (the data's cap: prompts
    plus responses here stay well below it). Engines size their caches by it (every KV-cache slot holds this
    many positions, so it sets the bytes per slot and with the memory budget the number of slots) and callers
    bound prompt lengths by it, so both ask here."""
    if requested:
        return requested
    from transformers import AutoConfig

    return min(AutoConfig.from_pretrained(model_dir).max_position_embeddings, DEFAULT_MAX_CONTEXT)


def check_options(spec: EngineSpec, known: Iterable[str]) -> None:
    """ValueError naming the first key of `spec.options` that the engine of `spec.kind` does not take."""
    known = sorted(known)
    for key in spec.options:
        if key not in known:
            raise ValueError(f"engine.options.{key} is not an option of the {spec.kind!r} engine; "
                             f"its options: {', '.join(known) or 'none'}")


def engine_class(kind: str) -> type:
    """The class registered for `kind`, imported now. ValueError for an unknown kind; ImportError (its `name`
    the missing module) when the engine's package is not installed: an import that fails, or a class whose
    REQUIRES = (module, install command) names a module that is not there (its module imports without it)."""
    if kind not in ENGINES:
        raise ValueError(f"engine.kind={kind!r} is not a known engine; known: {', '.join(ENGINES)}")
    module, _, cls = ENGINES[kind].partition(":")
    try:
        found = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ImportError(f"engine.kind={kind!r} cannot be used here: {e}", name=e.name) from e
    required, install = getattr(found, "REQUIRES", (None, ""))
    if required is not None and importlib.util.find_spec(required) is None:
        raise ImportError(f"engine.kind={kind!r} cannot be used here: it needs the {required} package, "
                          f"which is not installed: {install}", name=required)
    return found


def make_engine(spec: EngineSpec) -> Engine:
    """Build the engine `spec.kind` names for the checkpoint in `spec.model_dir`."""
    return engine_class(spec.kind).from_spec(spec)
