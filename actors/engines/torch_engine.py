"""The project's own torch inference engine for Llama-family decoders (implements `Engine`).

Scheduling (`generate`): continuous batching over a fixed set of cache slots. Each loop iteration
(1) admits waiting requests into the lowest free slots and prefills them together (right-padded, one
forward per chunk of at most `max_prefill_tokens` padded tokens), sampling each one's first token, then
(2) queues one decode step over slots [0, B), B = highest active slot + 1, and (3) records the tokens of the
step queued in the previous iteration. Running one step ahead keeps the GPU busy while the host does its
bookkeeping; a sequence that ended gets one extra, discarded step. Finished sequences free their slot, so
the next waiting request takes it in the following iteration.

Device state lives in preallocated per-slot tensors (`_SlotState`): last token, position, step counter,
sampling parameters, and a log-prob buffer, so a decode step has static shapes given (B, window). On GPU a
step is a replayed CUDA graph (`cuda_graphs.py`) whose attention is a Triton kernel reading each slot's
cache only up to its own length (`decode_attention.py`). The only device->host transfer per step is the
[B] vector of new tokens (asynchronous, into pinned memory), which the host needs to decide stopping; host
bookkeeping (`_HostState`) is vectorised with numpy except for the few sequences that finish or carry stop
strings.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from actors.engines import DEFAULT_GPU_MEMORY_FRACTION, EngineSpec, check_options, context_length, decode_attention
from actors.engines.cuda_graphs import DecodeGraphs, decode_window

# Padded prompt tokens per prefill forward. Prefill runs eagerly (no graphs), so at a small model the host's
# ~20 launches per layer, not the GPU, set its time: fewer, larger chunks (256 x 128 tokens in one forward)
# cut that. Causal flash attention keeps the chunk's memory linear in its tokens: the transient activations
# are about tokens x (3 x intermediate + 4 x hidden) x 2 bytes (~2 GB for a 1B model, ~3.5 GB for 8B);
# engine.options.max_prefill_tokens lowers it.
DEFAULT_PREFILL_TOKENS = 32768
from actors.engines.kv_cache import CachePlan, cache_budget, plan_cache
from actors.engines.llama import ForwardContext, ModelArgs, Transformer, hf_views, internal_to_hf
from actors.engines.protocol import FinishReason, GenerationRequest, GenerationResult, WeightBucket
from actors.engines.sampling import sample_tokens, split_seed, token_logprobs
from refit_wire import entry_views, layout_spans, torch_dtype, unpack_bucket

KV_LEN_BUCKET = 64  # CPU decode attends over a multiple of this many cache positions (fewer distinct shapes)
LOGITS_CHUNK = 1024  # rows per lm_head call in `score`, bounding the [rows, vocab] buffer


class TorchEngine:
    # A sampled sequence's tokens depend only on its seed, never on the rest of the batch (sampling.py), so a
    # resumed run regenerates in-flight prompts exactly and needs no rollout journal.
    BATCH_INVARIANT = True
    # What EngineSpec.options may set (the keyword arguments of __init__ past the spec's own fields), with
    # the values each takes. `type(v) is` keeps True from passing as an int.
    OPTIONS = {
        "max_prefill_tokens": (lambda v: type(v) is int and v >= 1, "a positive integer"),
        "cuda_graphs": (lambda v: type(v) is bool, "true or false"),
        "decode_kernel": (lambda v: v is None or type(v) is bool, "true, false or null"),
    }

    @classmethod
    def check_spec(cls, spec: EngineSpec) -> None:
        if spec.tensor_parallel != 1:
            raise ValueError(f"engine.tensor_parallel={spec.tensor_parallel}: the torch engine runs a replica on one "
                             "device; tensor parallelism inside a replica is engine.kind=trtllm's")
        check_options(spec, cls.OPTIONS)
        for key, value in spec.options.items():
            valid, wanted = cls.OPTIONS[key]
            if not valid(value):
                raise ValueError(f"engine.options.{key} must be {wanted}, got {value!r}")

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> "TorchEngine":
        cls.check_spec(spec)
        return cls(spec.model_dir, device=spec.device, dtype=spec.dtype, max_batch_size=spec.max_batch_size,
                   max_seq_len=spec.max_seq_len, weight_version=spec.weight_version,
                   kv_cache_memory_gb=spec.kv_cache_memory_gb, gpu_memory_fraction=spec.gpu_memory_fraction,
                   **spec.options)

    def __init__(
        self,
        model_dir: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 64,
        max_seq_len: int | None = None,
        weight_version: int = 0,
        kv_cache_memory_gb: float | None = None,
        gpu_memory_fraction: float = DEFAULT_GPU_MEMORY_FRACTION,
        max_prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
        cuda_graphs: bool = True,
        decode_kernel: bool | None = None,
    ) -> None:
        """`max_batch_size`: the cap on cache slots; the engine gets min(max_batch_size, what the KV-cache
        budget holds at full context) slots (`cache_plan`, `kv_cache.plan_cache`), and `max_batch_size` then
        reports that number (sequences decoded at once). `kv_cache_memory_gb` / `gpu_memory_fraction`: that
        budget (EngineSpec). `decode_kernel`: the Triton path: decode attention, fused norms and SwiGLU (None:
        on CUDA when Triton is installed; True elsewhere only under Triton's interpreter, for tests)."""
        self.device = torch.device(device)
        config = AutoConfig.from_pretrained(model_dir)
        self.max_seq_len = context_length(model_dir, max_seq_len)
        self.max_prefill_tokens = max_prefill_tokens
        self.args = ModelArgs.from_hf_config(config, self.max_seq_len)
        # Sized before the weights are allocated: a budget that holds no sequence fails at once.
        a = self.args
        self.cache_plan: CachePlan = plan_cache(
            num_layers=a.num_layers, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, dtype=torch_dtype(dtype),
            max_seq_len=self.max_seq_len, max_batch_size=max_batch_size,
            budget=cache_budget(self.device, kv_cache_memory_gb, gpu_memory_fraction))
        self.max_batch_size = slots = self.cache_plan.slots
        self.model = Transformer(self.args, max_seq_len=self.max_seq_len, device=self.device, dtype=torch_dtype(dtype))
        self.model.eval()
        self._views = hf_views(self.model)
        self._load_checkpoint(Path(model_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.stop_token_ids = _engine_stop_ids(Path(model_dir), config, self.tokenizer)
        self.cache = self.model.new_cache(slots)
        self._slots = _SlotState(slots, self.max_seq_len, self.device)
        self.weight_version = weight_version
        self._kernel = decode_attention.available(self.device) if decode_kernel is None else decode_kernel
        self.model.fused = self._kernel  # the fused norm/SwiGLU kernels come with the Triton path
        # GPU decode steps replay captured graphs (weights are updated in place, so refits keep them valid).
        self._graphs = (DecodeGraphs(self._eager_decode, slots, self.max_seq_len)
                        if cuda_graphs and self.device.type == "cuda" else None)
        if self.device.type == "cuda":  # where decode steps' tokens land on the host (see _launch_decode)
            self._host_tokens = [torch.empty(slots, dtype=torch.int64, pin_memory=True) for _ in range(2)]

    # ------------------------------------------------------------------------------------------- weights

    def named_parameters_hf(self) -> dict[str, torch.Tensor]:
        return dict(self._views)

    def adopt_layout(self, entry: Mapping) -> torch.Tensor | None:
        """Move the parameters into one flat buffer laid out as the refit-bucket layout `entry` lays out the
        weights, so that a refit from memory with that layout (CUDA IPC) is one copy of the whole buffer instead
        of one per weight. Returns the buffer (uint8, entry["nbytes"]), or None, with nothing changed, where the
        layout does not allow it: another dtype than the engine's, or a fused parameter (q/k/v, gate/up) whose
        pieces are not back to back in order. Call it between generations: it re-captures the CUDA graphs."""
        spans = {name: (offset, nbytes, dtype)
                 for name, dtype, _, offset, nbytes in layout_spans(entry, entry["nbytes"])}
        dtype = self.model.embed_tokens.weight.dtype
        placed: dict[str, int] = {}  # internal parameter -> byte offset in the buffer
        for internal, pieces in internal_to_hf(self.args).items():
            offset = spans[pieces[0].hf_name][0]
            end = offset
            for piece in pieces:  # weight_map lists a fused tensor's pieces in row order
                start, nbytes, piece_dtype = spans[piece.hf_name]
                if piece_dtype != dtype or start != end:
                    return None
                end = start + nbytes
            placed[internal] = offset
        flat = torch.zeros(entry["nbytes"], dtype=torch.uint8, device=self.device)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                view = flat[placed[name]: placed[name] + param.numel() * param.element_size()]
                view = view.view(dtype).view(param.shape)
                view.copy_(param)
                param.data = view
        self._views = hf_views(self.model)
        if self._graphs is not None:  # captured over the old parameters' addresses
            self._graphs = DecodeGraphs(self._eager_decode, self.max_batch_size, self.max_seq_len)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the old parameters' memory, back to the GPU the pools share
        return flat

    def _load_checkpoint(self, model_dir: Path) -> None:
        seen: set[str] = set()
        with torch.no_grad():
            for path in _safetensors_files(model_dir):
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        if self._ignorable_checkpoint_key(name):
                            continue
                        self._check_entry(name, tuple(f.get_slice(name).get_shape()), seen)
                        self._views[name].copy_(f.get_tensor(name))
        self._check_all_set(seen)

    def _ignorable_checkpoint_key(self, name: str) -> bool:
        # Old checkpoints store rope buffers; some tied checkpoints store a copy of the embedding as lm_head.
        tied_copy = name == "lm_head.weight" and self.args.tie_word_embeddings
        return tied_copy or name.endswith("rotary_emb.inv_freq")

    def load_weights(self, buckets: Sequence[WeightBucket], version: int) -> None:
        """Validate every bucket first, so a bad refit leaves the weights untouched."""
        self.check_layout([{**vars(b), "nbytes": b.data.size} for b in buckets])
        with torch.no_grad():
            for bucket in buckets:
                for name, tensor in unpack_bucket(bucket).items():
                    self._views[name].copy_(tensor)
        self.weight_version = version

    def check_layout(self, layout: Sequence[Mapping]) -> None:
        """ValueError unless the buckets set every parameter exactly once, with its shape, each entry inside
        its bucket and aligned."""
        seen: set[str] = set()
        for bucket in layout:
            for name, _, shape, _, _ in layout_spans(bucket, bucket["nbytes"]):
                self._check_entry(name, shape, seen)
        self._check_all_set(seen)

    def load_flat_bucket(self, entry: Mapping, data: torch.Tensor) -> None:
        """Copy (casting where the dtypes differ) one received bucket into the parameters. `data` is a flat
        uint8 tensor laid out as `entry`, a bucket of a layout `check_layout` accepted."""
        with torch.no_grad():
            for name, tensor in entry_views(entry, data).items():
                self._views[name].copy_(tensor)

    def _check_entry(self, name: str, shape: tuple[int, ...], seen: set[str]) -> None:
        if name not in self._views:
            hint = " (embeddings are tied: send model.embed_tokens.weight only)" if name == "lm_head.weight" else ""
            raise ValueError(f"unknown parameter {name!r}{hint}")
        if name in seen:
            raise ValueError(f"parameter {name!r} is set more than once")
        expected = tuple(self._views[name].shape)
        if shape != expected:
            raise ValueError(f"parameter {name!r} has shape {shape}, expected {expected}")
        seen.add(name)

    def _check_all_set(self, seen: set[str]) -> None:
        missing = sorted(set(self._views) - seen)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"missing parameters: {missing[:5]}{more}")

    # --------------------------------------------------------------------------------------------- score

    def score(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> list[list[float]]:
        if len(sequences) != len(prompt_lens):
            raise ValueError(f"{len(sequences)} sequences but {len(prompt_lens)} prompt_lens")
        for seq, p in zip(sequences, prompt_lens):
            self._check_tokens(seq, limit=self.max_seq_len)
            if not 1 <= p <= len(seq):
                raise ValueError(f"prompt_len {p} must be in [1, {len(seq)}] (the first token has no context)")
        out: list[list[float]] = [[] for _ in sequences]
        with torch.inference_mode():
            lengths = [len(s) for s in sequences]
            for chunk in _chunks_by_tokens(range(len(sequences)), lengths, self.max_prefill_tokens):
                scored = self._score_chunk([sequences[i] for i in chunk], [prompt_lens[i] for i in chunk])
                for i, lp in zip(chunk, scored):
                    out[i] = lp
        return out

    def _score_chunk(self, sequences: list[Sequence[int]], prompt_lens: list[int]) -> list[list[float]]:
        tokens, lengths = self._pad(sequences)
        hidden = self.model.hidden_states(tokens, ForwardContext.full(lengths, tokens.shape[1]))
        # Hidden state at position t predicts token t + 1: take t in [prompt_len - 1, len - 1).
        rows = np.concatenate([np.full(len(s) - p, i) for i, (s, p) in enumerate(zip(sequences, prompt_lens))])
        cols = np.concatenate([np.arange(p - 1, len(s) - 1) for s, p in zip(sequences, prompt_lens)])
        rows_t = torch.as_tensor(rows, dtype=torch.int64, device=self.device)
        cols_t = torch.as_tensor(cols, dtype=torch.int64, device=self.device)
        selected, targets = hidden[rows_t, cols_t], tokens[rows_t, cols_t + 1]
        logprobs = torch.cat(
            [
                token_logprobs(self.model.logits(selected[i : i + LOGITS_CHUNK]), targets[i : i + LOGITS_CHUNK])
                for i in range(0, len(rows), LOGITS_CHUNK)
            ]
            or [torch.empty(0, device=self.device)]
        ).tolist()
        counts = [len(s) - p for s, p in zip(sequences, prompt_lens)]
        bounds = np.cumsum([0] + counts)
        return [logprobs[bounds[i] : bounds[i + 1]] for i in range(len(sequences))]

    def forward_logits(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Float32 logits [len_i, vocab] for every position of every sequence (one padded batch; for tests)."""
        for seq in sequences:
            self._check_tokens(seq, limit=self.max_seq_len)
        with torch.inference_mode():
            tokens, lengths = self._pad(sequences)
            logits = self.model.logits(self.model.hidden_states(tokens, ForwardContext.full(lengths, tokens.shape[1])))
            return [logits[i, : len(s)].cpu() for i, s in enumerate(sequences)]

    # ------------------------------------------------------------------------------------------ generate

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        for r in requests:
            self._check_request(r)
        host = _HostState(requests, self.max_batch_size, self.max_seq_len, self.stop_token_ids, self.tokenizer)
        results: list[GenerationResult | None] = [None] * len(requests)
        waiting = deque(range(len(requests)))
        in_flight: _Step | None = None
        with torch.inference_mode():
            while waiting or host.any_active():
                free = host.free_slots()
                if waiting and free:
                    admitted = [(slot, waiting.popleft()) for slot in free[: len(waiting)]]
                    lengths = [len(requests[i].prompt_ids) for _, i in admitted]
                    for chunk in _chunks_by_tokens(admitted, lengths, self.max_prefill_tokens):
                        self._finish(host, self._prefill(host, chunk), results)
                # One step ahead: step k is queued on the device before the host reads step k - 1's tokens, so
                # the device never waits for host bookkeeping. A sequence that ended at step k - 1 gets one
                # wasted extra step, whose token `_record` drops.
                launched = self._launch_decode(host, in_flight is not None) if host.any_active() else None
                if in_flight is not None:
                    self._finish(host, self._record(host, in_flight), results)
                in_flight = launched  # left over at the end: a step over ended sequences only, never read
        done = [r for r in results if r is not None]
        assert len(done) == len(requests), "every request finishes before the loop exits"
        return done

    def _prefill(self, host: "_HostState", admitted: list[tuple[int, int]]) -> list["_Finished"]:
        slots = [slot for slot, _ in admitted]
        reqs = [host.requests[i] for _, i in admitted]
        for slot, i in admitted:
            host.assign(slot, i)
        slot_t = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self._slots.assign(slot_t, reqs)
        tokens, lengths = self._pad([r.prompt_ids for r in reqs])
        logits = self.model.prefill(tokens, lengths, slot_t, self.cache)
        new_tokens = self._sample(logits, slot_t, host, np.asarray(slots))
        self._slots.tokens[slot_t] = new_tokens
        return host.record(np.asarray(slots), new_tokens.cpu().numpy())

    def _launch_decode(self, host: "_HostState", step_in_flight: bool) -> "_Step":
        """Queue one decode step over slots [0, B) and the copy of its tokens to the host."""
        b = host.extent()
        needed = host.max_total_len(b) + int(step_in_flight)  # that step's token is not recorded yet
        if self._graphs is not None:
            logits, argmax = self._graphs.run(b, needed)
        elif self._kernel:  # the kernel compiles one variant per window: keep to the graphs' few windows
            logits, argmax = self._eager_decode(b, decode_window(needed, self.max_seq_len))
        else:
            logits, argmax = self._eager_decode(b, min(-(-needed // KV_LEN_BUCKET) * KV_LEN_BUCKET, self.max_seq_len))
        s = self._slots
        rows = torch.arange(b, device=self.device)
        new_tokens = self._sample(logits, rows, host, np.arange(b), argmax)
        s.tokens[:b] = new_tokens
        s.positions[:b] += s.active[:b]  # free slots stay at position 0, inside the cache
        if self.device.type != "cuda":
            return _Step(b, new_tokens.numpy(), None, host.epoch[:b].copy())
        self._host_tokens = self._host_tokens[::-1]  # two pinned buffers: one being filled, one being read
        buffer = self._host_tokens[0]
        buffer[:b].copy_(new_tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Step(b, buffer[:b].numpy(), ready, host.epoch[:b].copy())

    def _record(self, host: "_HostState", step: "_Step") -> list["_Finished"]:
        if step.ready is not None:
            step.ready.synchronize()
        return host.record(np.arange(step.rows), step.tokens, step.epochs)

    def _eager_decode(self, rows: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [rows, V] (model dtype) and their argmax for slots [0, rows) (what a graph captures)."""
        s = self._slots
        logits = self.model.decode(s.tokens[:rows], s.positions[:rows], self.cache, kv_len, kernel=self._kernel)
        return logits, logits.argmax(dim=-1)

    def _sample(
        self, logits: torch.Tensor, rows: torch.Tensor, host: "_HostState", rows_np: np.ndarray,
        argmax: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample for slot indices `rows` (device) / `rows_np` (host), advancing their step counters.
        `argmax`: the logits' argmax when already computed (all-greedy rows then skip the sampler)."""
        s = self._slots
        steps = s.steps[rows]
        greedy = host.all_greedy(rows_np)
        if greedy and argmax is not None:
            tokens = argmax
        else:
            tokens = sample_tokens(
                logits, s.temperature[rows], s.top_k[rows], s.top_p[rows], s.seed_lo[rows], s.seed_hi[rows], steps,
                all_greedy=greedy,
            )
        if host.wants_logprobs(rows_np):
            s.logprobs[rows, steps] = token_logprobs(logits, tokens)
        s.steps[rows] = steps + s.active[rows]
        return tokens

    def _finish(self, host: "_HostState", finished: list["_Finished"], results: list[GenerationResult | None]) -> None:
        if not finished:
            return
        slots = torch.tensor([f.slot for f in finished], dtype=torch.int64, device=self.device)
        # One transfer for all log-prob rows that finished this step.
        logprob_rows = self._slots.logprobs[slots].cpu() if any(f.want_logprobs for f in finished) else None
        for j, f in enumerate(finished):
            results[f.request] = GenerationResult(
                token_ids=f.token_ids,
                finish_reason=f.reason,
                weight_version=self.weight_version,
                logprobs=logprob_rows[j, : len(f.token_ids)].tolist() if f.want_logprobs else None,
                stop_text=f.stop_text,
            )
        self._slots.release(slots)

    # ------------------------------------------------------------------------------------------- helpers

    def _pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad with token 0 (masked out); returns tokens [B, T] and lengths [B] on the device."""
        lengths = [len(s) for s in sequences]
        padded = np.zeros((len(sequences), max(lengths)), dtype=np.int64)
        for i, s in enumerate(sequences):
            padded[i, : len(s)] = s
        return torch.from_numpy(padded).to(self.device), torch.tensor(lengths, dtype=torch.int64, device=self.device)

    def _check_tokens(self, ids: Sequence[int], limit: int) -> None:
        if len(ids) == 0:
            raise ValueError("empty token sequence")
        if len(ids) > limit:
            raise ValueError(
                f"sequence of {len(ids)} tokens exceeds the limit of {limit} (max_seq_len={self.max_seq_len})"
            )
        arr = np.asarray(ids)
        if arr.min() < 0 or arr.max() >= self.args.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.args.vocab_size}), got [{arr.min()}, {arr.max()}]")

    def _check_request(self, r: GenerationRequest) -> None:
        # One position must remain for the first generated token.
        self._check_tokens(r.prompt_ids, limit=self.max_seq_len - 1)
        p = r.sampling
        if p.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {p.max_new_tokens}")
        if p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0:
            raise ValueError(f"invalid sampling params: temperature={p.temperature}, top_p={p.top_p}, top_k={p.top_k}")


# ----------------------------------------------------------------------------------------- slot state


class _SlotState:
    """Per-slot decode inputs and sampling parameters, preallocated on the device (static shapes)."""

    def __init__(self, num_slots: int, max_seq_len: int, device: torch.device) -> None:
        def ints() -> torch.Tensor:
            return torch.zeros(num_slots, dtype=torch.int64, device=device)

        self.device = device
        self.tokens, self.positions, self.steps, self.active = ints(), ints(), ints(), ints()
        self.top_k, self.seed_lo, self.seed_hi = ints(), ints(), ints()
        self.temperature = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.logprobs = torch.zeros(num_slots, max_seq_len, dtype=torch.float32, device=device)

    def assign(self, slots: torch.Tensor, requests: list[GenerationRequest]) -> None:
        # One host->device transfer for the integer fields and one for the float fields.
        ints = torch.tensor(
            [[len(r.prompt_ids), 0, 1, r.sampling.top_k, *split_seed(r.seed)] for r in requests], dtype=torch.int64
        ).to(self.device)
        floats = torch.tensor(
            [[r.sampling.temperature, r.sampling.top_p] for r in requests], dtype=torch.float32
        ).to(self.device)
        for j, field in enumerate((self.positions, self.steps, self.active, self.top_k, self.seed_lo, self.seed_hi)):
            field[slots] = ints[:, j]
        self.temperature[slots], self.top_p[slots] = floats[:, 0], floats[:, 1]

    def release(self, slots: torch.Tensor) -> None:
        self.active[slots] = 0
        self.positions[slots] = 0


# ----------------------------------------------------------------------------------------- host state


@dataclass
class _Step:
    """A decode step queued on the device: its tokens for slots [0, rows) once `ready` (None: already there)."""

    rows: int
    tokens: np.ndarray
    ready: "torch.cuda.Event | None"
    epochs: np.ndarray  # each slot's assignment count at launch: a slot reassigned since gets no token from it


@dataclass
class _Finished:
    slot: int
    request: int
    token_ids: list[int]
    reason: FinishReason
    stop_text: str | None
    want_logprobs: bool


class _HostState:
    """Host-side bookkeeping for one `generate` call, as numpy arrays indexed by slot."""

    def __init__(
        self,
        requests: Sequence[GenerationRequest],
        num_slots: int,
        max_seq_len: int,
        stop_ids: Iterable[int],
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        self.requests, self.max_seq_len, self.tokenizer = requests, max_seq_len, tokenizer
        self.req = np.full(num_slots, -1, dtype=np.int64)  # request index per slot; -1 = free
        self.epoch = np.zeros(num_slots, dtype=np.int64)  # assignments per slot (see _Step.epochs)
        self.prompt_len = np.zeros(num_slots, dtype=np.int64)
        self.n_gen = np.zeros(num_slots, dtype=np.int64)
        self.max_new = np.zeros(num_slots, dtype=np.int64)
        self.greedy = np.ones(num_slots, dtype=bool)
        self.want_lp = np.zeros(num_slots, dtype=bool)
        self.has_stop_strings = np.zeros(num_slots, dtype=bool)
        width = max([len(r.sampling.stop_token_ids) for r in requests] + [1])
        self.extra_stop = np.full((num_slots, width), -1, dtype=np.int64)  # per-request stop ids, -1 padded
        self.global_stop = np.asarray(sorted(stop_ids), dtype=np.int64)
        self.out = np.zeros((num_slots, max_seq_len), dtype=np.int64)  # generated tokens per slot

    def free_slots(self) -> list[int]:
        return np.flatnonzero(self.req < 0).tolist()

    def any_active(self) -> bool:
        return bool((self.req >= 0).any())

    def extent(self) -> int:
        """Decode covers slots [0, extent): just past the highest active slot."""
        return int(np.flatnonzero(self.req >= 0)[-1]) + 1

    def max_total_len(self, b: int) -> int:
        """Longest prompt + generated length among active slots < b (= positions the next step attends)."""
        active = self.req[:b] >= 0
        return int((self.prompt_len[:b] + self.n_gen[:b])[active].max())

    def all_greedy(self, rows: np.ndarray) -> bool:
        return bool(self.greedy[rows][self.req[rows] >= 0].all())

    def wants_logprobs(self, rows: np.ndarray) -> bool:
        return bool(self.want_lp[rows][self.req[rows] >= 0].any())

    def assign(self, slot: int, request: int) -> None:
        r = self.requests[request]
        self.epoch[slot] += 1
        self.req[slot], self.prompt_len[slot], self.n_gen[slot] = request, len(r.prompt_ids), 0
        self.max_new[slot] = r.sampling.max_new_tokens
        self.greedy[slot] = r.sampling.temperature == 0
        self.want_lp[slot] = r.sampling.return_logprobs
        self.has_stop_strings[slot] = bool(r.sampling.stop_strings)
        self.extra_stop[slot] = -1
        self.extra_stop[slot, : len(r.sampling.stop_token_ids)] = r.sampling.stop_token_ids

    def record(self, slots: np.ndarray, tokens: np.ndarray, epochs: np.ndarray | None = None) -> list[_Finished]:
        """Append one new token per active slot; return (and free) the slots that finished. With `epochs`
        (a decode step's launch-time snapshot), slots reassigned since the launch are skipped."""
        active = self.req[slots] >= 0
        if epochs is not None:
            active &= self.epoch[slots] == epochs
        slots, tokens = slots[active], tokens[active]
        self.out[slots, self.n_gen[slots]] = tokens
        self.n_gen[slots] += 1
        n = self.n_gen[slots]
        hit_stop = np.isin(tokens, self.global_stop) | (self.extra_stop[slots] == tokens[:, None]).any(axis=1)
        too_long = (n >= self.max_new[slots]) | (self.prompt_len[slots] + n >= self.max_seq_len)
        candidates = hit_stop | too_long | self.has_stop_strings[slots]
        finished = []
        for slot, stop, long in zip(slots[candidates], hit_stop[candidates], too_long[candidates]):
            stop_text = self._stop_string(slot) if self.has_stop_strings[slot] and not stop else None
            if stop or stop_text is not None:
                finished.append(self._release(int(slot), "stop", stop_text))
            elif long:
                finished.append(self._release(int(slot), "length", None))
        return finished

    def _stop_string(self, slot: int) -> str | None:
        """The stop string that the newest token completed, if any. Checked every step, so only a window
        ending at the newest token needs decoding: a string of n UTF-8 bytes spans at most n tokens (every
        token carries >= 1 byte); two extra tokens absorb tokenizers' word-start handling at the edge."""
        strings = self.requests[self.req[slot]].sampling.stop_strings
        n = self.n_gen[slot]
        window = max(len(s.encode("utf-8")) for s in strings) + 2
        text = self.tokenizer.decode(self.out[slot, max(0, n - window) : n].tolist())
        hits = [(text.find(s), s) for s in strings if s in text]
        return min(hits)[1] if hits else None

    def _release(self, slot: int, reason: FinishReason, stop_text: str | None) -> _Finished:
        request = int(self.req[slot])
        tokens = self.out[slot, : self.n_gen[slot]].tolist()
        self.req[slot] = -1
        return _Finished(slot, request, tokens, reason, stop_text, bool(self.want_lp[slot]))


# ----------------------------------------------------------------------------------- module helpers


def _chunks_by_tokens(items: Sequence, lengths: Sequence[int], budget: int) -> list[list]:
    """Split `items` (in order) into consecutive groups whose padded size (count * max length) fits the
    budget; an item longer than the budget gets a group of its own."""
    chunks: list[list] = []
    current: list = []
    longest = 0
    for item, n in zip(items, lengths):
        if current and (len(current) + 1) * max(longest, n) > budget:
            chunks.append(current)
            current, longest = [], 0
        current.append(item)
        longest = max(longest, n)
    if current:
        chunks.append(current)
    return chunks


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def _as_ids(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _engine_stop_ids(model_dir: Path, config, tokenizer) -> set[int]:
    """EOS ids from config.json, generation_config.json (often the chat end-of-turn ids) and the tokenizer."""
    ids = set(_as_ids(getattr(config, "eos_token_id", None)))
    generation_config = model_dir / "generation_config.json"
    if generation_config.exists():
        ids |= set(_as_ids(json.loads(generation_config.read_text()).get("eos_token_id")))
    ids |= set(_as_ids(tokenizer.eos_token_id))
    return ids
