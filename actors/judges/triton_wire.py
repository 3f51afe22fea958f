"""The remote judge's wire format: the engine protocol (actors/engines/protocol.py) as Triton tensors.

The server (actors/serve_judge.py) is an engine behind Triton: one Triton request carries a batch of
GenerationRequests, one row each, and returns one GenerationResult per row. Token ids travel, not text, so
the client renders the judge prompt exactly as a local judge does (same template, chat template and
tokenizer) and a request with the same seed gives the same tokens remotely as locally. Sampling parameters
travel as JSON so that floats arrive exactly (0.7 is not a float32).

A second model, `<name>_info`, answers with what a client needs before its first request: the server's
context length, vocabulary size, rows per request and the served model's tokenizer files (so the client
decodes and templates with the tokenizer the server generates with, without a copy of its own).

Nothing a server sends is trusted: `decode_results` checks every field and raises MalformedReply.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping, Sequence

import numpy as np

from actors.engines.protocol import GenerationRequest, GenerationResult, SamplingParams

WIRE_VERSION = 1
PAD = -1  # pads token-id rows to the longest row of a request
INFO_SUFFIX = "_info"
# Tokenizer files a client needs (decoding, chat template, special tokens): text only, nothing executable.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
# (name, numpy dtype, Triton dtype, per-row shape)
INPUTS = (("prompt_ids", np.int64, "INT64", (-1,)), ("prompt_len", np.int64, "INT64", (1,)),
          ("sampling", np.bytes_, "BYTES", (1,)), ("seed", np.int64, "INT64", (1,)))
OUTPUTS = (("token_ids", np.int64, "INT64", (-1,)), ("num_tokens", np.int64, "INT64", (1,)),
           ("finish_reason", np.bytes_, "BYTES", (1,)), ("stop_text", np.bytes_, "BYTES", (1,)),
           ("weight_version", np.int64, "INT64", (1,)))
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


class MalformedReply(ValueError):
    """A server's reply that does not hold what the request asked for."""


def _padded(rows: Sequence[Sequence[int]]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0) or 1
    out = np.full((len(rows), width), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _text_column(values: Sequence[str]) -> np.ndarray:
    return np.array([[v.encode()] for v in values], dtype=np.object_)


def _texts(column: np.ndarray) -> list[str]:
    return [(v.decode() if isinstance(v, bytes) else str(v)) for v in column.reshape(len(column), -1)[:, 0]]


def sampling_json(s: SamplingParams) -> str:
    return json.dumps({f: getattr(s, f) for f in SAMPLING_FIELDS})


def encode_requests(requests: Sequence[GenerationRequest]) -> dict[str, np.ndarray]:
    return {"prompt_ids": _padded([list(r.prompt_ids) for r in requests]),
            "prompt_len": np.array([[len(r.prompt_ids)] for r in requests], dtype=np.int64),
            "sampling": _text_column([sampling_json(r.sampling) for r in requests]),
            "seed": np.array([[r.seed] for r in requests], dtype=np.int64)}


def decode_requests(inputs: Mapping[str, np.ndarray]) -> list[GenerationRequest]:
    """The server's side: ValueError naming the row and field for anything it cannot serve."""
    ids, lens, seeds = inputs["prompt_ids"], inputs["prompt_len"].reshape(-1), inputs["seed"].reshape(-1)
    samplings = _texts(inputs["sampling"])
    if not len(ids) == len(lens) == len(seeds) == len(samplings):
        raise ValueError("prompt_ids, prompt_len, sampling and seed must have one row per request")
    requests = []
    for row, (n, text, seed) in enumerate(zip(lens, samplings, seeds)):
        if not 0 < n <= ids.shape[1]:
            raise ValueError(f"row {row}: prompt_len={n} is outside 1..{ids.shape[1]}")
        try:
            fields = json.loads(text)
            unknown = set(fields) - set(SAMPLING_FIELDS)
            if unknown:
                raise ValueError(f"unknown sampling field(s) {sorted(unknown)}")
            for key in ("stop_token_ids", "stop_strings"):
                if key in fields:
                    fields[key] = tuple(fields[key])
            sampling = SamplingParams(**fields)
        except (ValueError, TypeError) as e:
            raise ValueError(f"row {row}: sampling is not a SamplingParams JSON object: {e}") from None
        requests.append(GenerationRequest([int(t) for t in ids[row, :n]], sampling, int(seed)))
    return requests


def encode_results(results: Sequence[GenerationResult]) -> dict[str, np.ndarray]:
    return {"token_ids": _padded([r.token_ids for r in results]),
            "num_tokens": np.array([[len(r.token_ids)] for r in results], dtype=np.int64),
            "finish_reason": _text_column([r.finish_reason for r in results]),
            "stop_text": _text_column([r.stop_text or "" for r in results]),
            "weight_version": np.array([[r.weight_version] for r in results], dtype=np.int64)}


def decode_results(outputs: Mapping[str, np.ndarray | None], requests: Sequence[GenerationRequest],
                   vocab_size: int) -> list[GenerationResult]:
    """The client's side: one result per request, each field checked; MalformedReply for anything else."""
    n = len(requests)
    for name, _, _, _ in OUTPUTS:
        value = outputs.get(name)
        if value is None or not isinstance(value, np.ndarray) or value.ndim != 2 or len(value) != n:
            shape = None if value is None else getattr(value, "shape", type(value).__name__)
            raise MalformedReply(f"output {name!r} should have {n} rows, got {shape}")
    ids, counts = outputs["token_ids"], outputs["num_tokens"][:, 0]
    if ids.dtype.kind not in "iu" or counts.dtype.kind not in "iu":
        raise MalformedReply(f"token_ids/num_tokens should be integers, got {ids.dtype}/{counts.dtype}")
    reasons, stops = _texts(outputs["finish_reason"]), _texts(outputs["stop_text"])
    results = []
    for row, request in enumerate(requests):
        count, reason, stop = int(counts[row]), reasons[row], stops[row]
        if not 0 <= count <= min(ids.shape[1], request.sampling.max_new_tokens):
            raise MalformedReply(f"row {row}: {count} tokens, outside 0..{request.sampling.max_new_tokens}")
        tokens = [int(t) for t in ids[row, :count]]
        if any(not 0 <= t < vocab_size for t in tokens):
            raise MalformedReply(f"row {row}: a token id outside the vocabulary (0..{vocab_size - 1})")
        if reason not in ("stop", "length"):
            raise MalformedReply(f"row {row}: finish_reason {reason!r} is not 'stop' or 'length'")
        if stop and (reason != "stop" or stop not in request.sampling.stop_strings):
            raise MalformedReply(f"row {row}: stop_text {stop!r} is not one of the request's stop strings")
        results.append(GenerationResult(tokens, reason, int(outputs["weight_version"][row, 0]), None, stop or None))
    return results


def info_json(*, max_seq_len: int, vocab_size: int, max_batch_size: int, model: str,
              tokenizer_files: Mapping[str, str]) -> str:
    return json.dumps({"wire_version": WIRE_VERSION, "max_seq_len": max_seq_len, "vocab_size": vocab_size,
                       "max_batch_size": max_batch_size, "model": model, "tokenizer": dict(tokenizer_files)})


def parse_info(text: str) -> dict:
    """The `<name>_info` reply, checked; MalformedReply if it is not what serve_judge sends."""
    try:
        info = json.loads(text)
    except ValueError as e:
        raise MalformedReply(f"the info reply is not JSON: {e}") from None
    if not isinstance(info, dict) or info.get("wire_version") != WIRE_VERSION:
        raise MalformedReply(f"the info reply is not wire version {WIRE_VERSION} of actors.serve_judge")
    for key in ("max_seq_len", "vocab_size", "max_batch_size"):
        if type(info.get(key)) is not int or info[key] < 1:
            raise MalformedReply(f"the info reply's {key} is {info.get(key)!r}, not a positive integer")
    files = info.get("tokenizer")
    if not isinstance(files, dict) or "tokenizer_config.json" not in files or not all(
            isinstance(k, str) and isinstance(v, str) and k in TOKENIZER_FILES for k, v in files.items()):
        raise MalformedReply("the info reply's tokenizer is not a set of tokenizer files")
    return info
