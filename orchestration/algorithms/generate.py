"""The data-parallel batch generation job (SPEC section 8, `algorithm=generate`).

Prompts are cut into chunks of `rollout_batch_size`, spread round-robin over every generator replica
(two chunks in flight per replica keep each one busy), and written back strictly in input order, one line
per prompt. A request's seed depends only on (seed, prompt index, sample index), so the file is the same
whatever the number of replicas, and a rerun that resumes after the last complete line regenerates exactly
what an uninterrupted run would have written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, asdict
from pathlib import Path

import ray
from ray.exceptions import RayError
from tqdm import tqdm

from actors.engines.protocol import GenerationRequest

from ..cluster import RECOVERABLE, Pools
from ..config import Config, ConfigError, sampling_params
from ..context import RunContext
from ..resumable_output import ResumableJsonl
from ..rollout import derive_seed, response_text

CHUNKS_PER_REPLICA = 2


@dataclass
class GenerationSummary:
    output_file: str
    prompts: int  # lines in the file at the end
    resumed_at: int  # lines already complete when this run started
    generated_prompts: int = 0  # by this run
    responses: int = 0
    unended: int = 0  # responses that hit max_new_tokens
    dropped_unended: int = 0  # ... left out because generation.keep_unended=false
    skipped_prompts: int = 0  # too long for the model: written with no responses and a "skipped" reason
    tokens: int = 0
    seconds: float = 0.0
    repaired_bytes: int = 0  # of a torn last line found on start

    def as_dict(self) -> dict:
        return asdict(self)


def output_path(cfg: Config) -> Path:
    out = cfg.generation.output_file or str(Path(cfg.output_dir) / "generations.jsonl")
    return Path(out).expanduser().resolve()


def settings(cfg: Config, model_dir: Path) -> dict:
    """What decides the file's content: a rerun must match it to resume."""
    s = cfg.algorithm.sampling
    return {"input": str(Path(cfg.data.train_file).expanduser().resolve()) if cfg.data.train_file else "toy",
            "model": str(model_dir), "seed": cfg.seed, "num_responses_to_gen": cfg.algorithm.num_responses_to_gen,
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "max_new_tokens": s.max_new_tokens,
            "stop_strings": list(s.stop_strings), "keep_unended": cfg.generation.keep_unended,
            "chat_template": cfg.data.chat_template, "max_prompt_length": cfg.data.max_prompt_length,
            "on_long_prompt": cfg.data.on_long_prompt}


def open_output(output: ResumableJsonl, total: int, log) -> int:
    """Open the output for appending and return where to resume: the number of complete lines."""
    start_at = output.open()
    if output.repaired_bytes:
        log(f"[generate] {output.path}: cut a torn last line ({output.repaired_bytes} bytes); it is regenerated")
    if start_at > total:
        output.close()
        raise ConfigError(f"{output.path} holds {start_at} lines but the input has only {total} prompts: "
                          "it was written from another input")
    last = output.last_record()
    if last is not None and last.get("index") != start_at - 1:
        output.close()
        raise ConfigError(f"{output.path}:{start_at}: index {last.get('index')!r}, expected {start_at - 1}: "
                          "the file is not this job's output in input order")
    if 0 < start_at < total:
        log(f"[generate] {output.path}: resuming after line {start_at} of {total}")
    return start_at


class BatchGeneration:
    def __init__(self, cfg: Config, ctx: RunContext, pools: Pools, output: ResumableJsonl):
        self.cfg, self.ctx, self.pools, self.output = cfg, ctx, pools, output
        self.generators = pools.generators
        self.sampling = sampling_params(cfg.algorithm.sampling, ctx.renderer.stop_strings)
        self.n = cfg.algorithm.num_responses_to_gen

    def run(self, start_at: int) -> GenerationSummary:
        """Generate prompts start_at.. into the (opened) output, which is closed at the end."""
        summary = GenerationSummary(str(self.output.path), start_at, start_at,
                                    repaired_bytes=self.output.repaired_bytes)
        try:
            self._generate(start_at, len(self.ctx.train), summary)
        finally:
            self.output.close()
        summary.prompts = start_at + summary.generated_prompts
        return summary

    def _generate(self, start_at: int, total: int, summary: GenerationSummary) -> None:
        size = self.cfg.algorithm.rollout_batch_size
        chunks = [range(i, min(i + size, total)) for i in range(start_at, total, size)]
        in_flight: dict[int, tuple] = {}  # chunk number -> (ref or None, prompts, requests): see _submit
        results: dict[int, list[dict]] = {}
        next_submit, next_write = 0, 0
        started = time.perf_counter()
        bar = tqdm(total=total, initial=start_at, unit="prompt", desc="generate", dynamic_ncols=True,
                   mininterval=1.0)
        try:
            while next_write < len(chunks):
                while next_submit < len(chunks) and len(in_flight) < CHUNKS_PER_REPLICA * len(self.generators):
                    in_flight[next_submit] = self._submit(next_submit, chunks[next_submit])
                    next_submit += 1
                refs = [ref for ref, _, _ in in_flight.values() if ref is not None]
                done = self.pools.wait(refs) if refs else set()
                for number, (ref, prompts, requests) in list(in_flight.items()):
                    if ref is not None and ref not in done:
                        continue
                    try:
                        results[number] = self._lines(prompts, ray.get(ref).results if ref else [], summary)
                        del in_flight[number]
                    except RECOVERABLE as e:  # the replica died: same requests, same seeds, once it is back
                        replica = number % len(self.generators)
                        self.generators.recover(replica, e)
                        in_flight[number] = (self.generators.call(replica, "generate", requests), prompts, requests)
                    except RayError as e:  # failed in its own code (out of memory, a bug): stop, say where
                        raise self.generators.call_failed(number % len(self.generators), "generate", e) from None
                while next_write in results:  # in input order, whole chunks at a time
                    lines = results.pop(next_write)
                    self.output.append(lines)
                    summary.generated_prompts += len(lines)
                    next_write += 1
                    bar.update(len(lines))
                    summary.seconds = time.perf_counter() - started
                    bar.set_postfix_str(f"{summary.tokens / summary.seconds:.0f} tok/s", refresh=False)
        finally:
            bar.close()
        summary.seconds = time.perf_counter() - started

    def _submit(self, number: int, indices: range) -> tuple:
        """Encode a chunk's prompts and send them to a replica; too-long prompts are kept as skipped.
        Returns (the call's ref, or None when no prompt fits; (index, conversation, encoded) per prompt; the
        requests, kept to issue again if the replica dies)."""
        prompts, requests = [], []
        for index in indices:
            conv = self.ctx.train[index]
            encoded = self.ctx.encode(conv)
            prompts.append((index, conv, encoded))
            if encoded is not None:
                requests += [GenerationRequest(encoded.prompt_ids, self.sampling,
                                               derive_seed(self.cfg.seed, "generate", index, j))
                             for j in range(self.n)]
        replica = number % len(self.generators)
        return (self.generators.call(replica, "generate", requests) if requests else None), prompts, requests

    def _lines(self, prompts: list, results: list, summary: GenerationSummary) -> list[dict]:
        lines, at = [], 0
        for index, conv, encoded in prompts:
            line = {"index": index, "prompt": [m.as_dict() for m in conv.prompt_messages], "metadata": conv.metadata}
            if encoded is None:
                summary.skipped_prompts += 1
                line["responses"] = []
                line["skipped"] = f"prompt longer than {self.ctx.max_prompt_length} tokens"
                lines.append(line)
                continue
            responses = []
            for result in results[at: at + self.n]:
                ended = result.finish_reason == "stop"
                summary.responses += 1
                summary.tokens += len(result.token_ids)
                summary.unended += not ended
                if not ended and not self.cfg.generation.keep_unended:
                    summary.dropped_unended += 1
                    continue
                responses.append({"text": response_text(self.ctx.tokenizer, result), "ended": ended,
                                  "tokens": len(result.token_ids)})
            at += self.n
            line["responses"] = responses
            lines.append(line)
        return lines
