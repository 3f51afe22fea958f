"""The inference-engine protocol: what every engine (torch, trtllm, remote) takes and returns.

Only plain data crosses this boundary (token-id lists, floats, small dataclasses), so results can travel
through Ray's object store and every engine returns exactly the same structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol, Sequence

import numpy as np

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature == 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # added to the engine's own end-of-turn/EOS ids
    stop_strings: tuple[str, ...] = ()
    return_logprobs: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    sampling: SamplingParams
    # Keys this request's random stream. Callers derive it from (seed, iteration, prompt index, sample
    # index) so a request gives the same tokens whatever replica or batch serves it.
    seed: int = 0


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only; includes the stop token when finish_reason == "stop"
    finish_reason: FinishReason  # "stop": ended on a stop token/string ("properly ended"); "length": truncated
    weight_version: int  # the weight version that produced it
    logprobs: list[float] | None = None  # log-prob of each generated token under the (unscaled) model
    stop_text: str | None = None  # the stop string that ended it, if a string did


@dataclass
class WeightBucket:
    """One flat buffer of parameters under Hugging Face names (the refit wire format).

    `data` is a uint8 array holding the tensors back to back; entry i occupies
    data[offsets[i] : offsets[i] + nbytes(i)] and is viewed as `dtypes[i]` (a torch dtype name such as
    "float32" or "bfloat16") with shape `shapes[i]`. Read from Ray's object store, `data` is a zero-copy
    read-only view of shared memory.
    """

    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    data: np.ndarray = field(repr=False)


# A bucket's layout: the fields of a WeightBucket but `data`, plus `nbytes` (the bucket's size), as a plain
# dict. The collective refit sends the layout once per group and then only the bytes of each bucket.
BucketLayout = Mapping[str, Any]


class Engine(Protocol):
    """What the generator and judge actors need from an engine."""

    weight_version: int

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Results in request order."""

    def score(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> list[list[float]]:
        """Log-probs of tokens sequences[i][prompt_lens[i]:] given everything before them."""

    def load_weights(self, buckets: Sequence[WeightBucket], version: int) -> None:
        """Copy the named tensors into the engine's parameters in place, then serve as `version`."""

    def check_layout(self, layout: Sequence[BucketLayout]) -> None:
        """ValueError unless the buckets set every parameter exactly once, with its shape (changes nothing)."""

    def load_flat_bucket(self, entry: BucketLayout, data: Any) -> None:
        """Copy one received bucket (a flat uint8 tensor laid out as `entry`) into the parameters in place.
        The caller sets `weight_version` once every bucket of a refit is in."""

    def named_parameters_hf(self) -> Mapping[str, object]:
        """Current parameters under Hugging Face names (tests and refit checks)."""
