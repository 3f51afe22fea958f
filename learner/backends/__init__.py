"""Learner backends behind one contract (`LearnerBackend`), built by name through a registry.

A new backend is one module with a class that satisfies `LearnerBackend` plus one line in `BACKENDS`;
tests/test_learner_contract.py checks every registered class against the protocol.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ..types import LossConfig, OptimConfig, TrainSample

# learner.backend -> "module:Class". Import strings: megatron-core is optional, so its backend is imported
# only when asked for.
BACKENDS: dict[str, str] = {
    "torch": "learner.backends.torch_backend:TorchBackend",
    "megatron": "learner.backends.megatron.backend:MegatronBackend",
}

# The keyword arguments every backend's constructor takes, after (model_dir, optim).
COMMON_ARGS = ("device", "dtype", "rank", "world_size", "seed", "reference_dir")


@runtime_checkable
class LearnerBackend(Protocol):
    """One rank of a learner. Built as cls(model_dir, optim, *, <COMMON_ARGS>, <its own options>) after the
    caller has joined the torch.distributed group (when world_size > 1).

    Batches arrive already split: each rank gets its data-parallel share (`data_parallel`); metrics and sums
    come back reduced over ranks, equal on every rank. Methods that run the model, and with `gathers_weights`
    also those that read weights (named_weights, export_buckets, save), are collective: call them on every
    rank. Rank 0 returns exports and writes checkpoints.
    """

    # Whether the full weights exist only by gathering over ranks: then every rank must take part in
    # named_weights, export_buckets and save (the others yield or return nothing); otherwise rank 0 alone.
    gathers_weights: bool
    # Whether named_weights yields the model's own tensors, updated in place by every step (not gathered or
    # converted copies): a CUDA IPC refit then maps them instead of packing a copy (learner/ipc_source.py).
    live_weights: bool
    device: torch.device

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(this rank's data-parallel index, data-parallel size): which share of a global batch it takes."""

    def train_step(self, samples: Sequence[TrainSample], loss_cfg: LossConfig) -> dict[str, float]:
        """One optimizer step on this rank's share; the global step's metrics."""

    def sft_nll(self, samples: Sequence[TrainSample]) -> tuple[float, float]:
        """(sum of token NLL, token count) of the chosen responses over every rank's share."""

    def logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                 reference: bool = False) -> list[list[float]]:
        """Per-token log-probs of each response given its prompt, under the policy or the reference."""

    def update_reference(self) -> None:
        """The reference model becomes the current weights (start of an iteration)."""

    def reset_optimizer(self) -> None:
        """A fresh optimizer and schedule (step 0)."""

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights under Hugging Face names, as the model computes with them (a tied lm_head left out)."""

    def export_buckets(self, bucket_bytes: int) -> list[dict]:
        """named_weights packed into refit buckets (refit_wire.pack_buckets); [] off rank 0."""

    def rng_state(self) -> dict:
        """This rank's random generators, for a checkpoint."""

    def save(self, path: str, rng_states: list[dict] | None = None) -> None:
        """A Hugging Face checkpoint directory plus optimizer, schedule and every rank's RNG state, published
        atomically by rank 0 (learner/checkpoint_files.py)."""

    def load_training_state(self, path: str) -> None:
        """Optimizer, schedule position and this rank's RNG state from a checkpoint `save` wrote."""


def backend_class(name: str) -> type:
    """The class registered as `name`, imported now; ValueError naming the config key for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"learner.backend={name!r} is not one of: {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(name: str, model_dir: str, optim: OptimConfig, options: Mapping[str, Any] | None = None,
                 **common: Any) -> LearnerBackend:
    """Build backend `name` on this rank. `common`: the arguments every backend takes (COMMON_ARGS);
    `options`: the backend's own (megatron: tensor_parallel, pipeline_parallel), ValueError for one it does not
    take."""
    cls = backend_class(name)
    options = dict(options or {})
    own = [p.name for p in inspect.signature(cls).parameters.values()
           if p.kind is p.KEYWORD_ONLY and p.name not in COMMON_ARGS]
    for key in options:
        if key not in own:
            raise ValueError(f"learner.{key} is not an option of learner.backend={name!r}; its options: "
                             f"{', '.join(own) or 'none'}")
    return cls(model_dir, optim, **common, **options)
