"""The inference-engine protocol: what every engine (torch, trtllm, remote) takes and returns.

Only plain data crosses this boundary (token-id lists, floats, small dataclasses), so results can travel
through Ray's object store and every engine returns exactly the same structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Mapping, Protocol, Sequence

from refit_wire import BucketLayout, WeightBucket  # the refit wire format, shared with the learner

if TYPE_CHECKING:
    import torch

    from . import EngineSpec

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


class Engine(Protocol):
    """What the generator and judge actors (and the refit path) use of an engine. Every engine returns the
    same structures, so callers never know which one serves them (tests/test_engine_contract.py).

    Attributes:
        weight_version: the version of the weights served now; recorded in every GenerationResult. Set by
            `load_weights`, or by the caller once every bucket of a collective refit is in.
        max_seq_len: the context, prompt plus generated tokens, that one sequence may fill.
        max_batch_size: how many sequences run at once (a larger `generate` call queues the rest).
    """

    weight_version: int
    max_seq_len: int
    max_batch_size: int

    @classmethod
    def check_spec(cls, spec: "EngineSpec") -> None:
        """ValueError naming `engine.options.<key>` for an option this engine does not take or a bad value;
        builds nothing (the driver calls it at start-up, before any model is loaded)."""

    @classmethod
    def from_spec(cls, spec: "EngineSpec") -> "Engine":
        """Build from a spec (what `make_engine` calls): load spec.model_dir's weights onto spec.device in
        spec.dtype, serve them as spec.weight_version; ValueError naming `engine.options.<key>` for an option
        this engine does not take."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in request order. A request ends with finish_reason "stop" on a stop token
        (the engine's own EOS/end-of-turn ids from the checkpoint, or sampling.stop_token_ids), kept as the
        last of token_ids, or when its generated text comes to contain one of sampling.stop_strings:
        token_ids then end with the token that completed the string and stop_text names it. Otherwise it
        ends with "length", after sampling.max_new_tokens tokens or when prompt plus generated tokens fill
        max_seq_len. temperature 0 is greedy; otherwise a request's tokens depend only on (request, seed),
        not on what else is in the batch. logprobs (with return_logprobs): each token's log-prob under the
        unscaled model, i.e. before temperature, top-k and top-p. ValueError, before any work, for a prompt
        that leaves no room for one new token, token ids outside the vocabulary or invalid sampling
        parameters."""

    def score(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> list[list[float]]:
        """For each sequence (in order), the log-probs of tokens sequences[i][prompt_lens[i]:] given everything
        before them, under the unscaled model. 1 <= prompt_lens[i] <= len(sequences[i]) <= max_seq_len."""

    def load_weights(self, buckets: Sequence[WeightBucket], version: int) -> None:
        """Copy the named tensors (Hugging Face names) into the parameters in place, then serve as `version`.
        Validates all buckets first (as `check_layout`): a bad refit raises ValueError and changes nothing."""

    def check_layout(self, layout: Sequence[BucketLayout]) -> None:
        """ValueError unless the buckets set every parameter exactly once, with its shape, each entry inside
        its bucket and aligned to its dtype. Changes nothing."""

    def load_flat_bucket(self, entry: BucketLayout, data: "torch.Tensor") -> None:
        """Copy one received bucket (a flat uint8 tensor laid out as `entry`, one bucket of a layout
        `check_layout` accepted; on the engine's device or the CPU) into the parameters in place, casting
        where dtypes differ. weight_version is not changed: the caller sets it once every bucket is in."""

    def named_parameters_hf(self) -> Mapping[str, "torch.Tensor"]:
        """The parameters served now under Hugging Face names (exports to a peer replica, refit checks)."""
