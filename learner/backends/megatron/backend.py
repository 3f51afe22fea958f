"""The `megatron` learner backend: megatron-core's GPTModel with tensor, pipeline and data parallelism.

One instance per rank; world size = tensor_parallel x pipeline_parallel x data parallel. megatron orders
ranks tensor-parallel first, then data parallel, then pipeline stage, so global rank 0 is tensor rank 0,
data rank 0 of the first stage: the rank that returns exports and writes checkpoints, as in the torch backend.

The `LearnerBackend` contract (learner/backends/__init__.py), with `gathers_weights`, and these megatron
specifics:
- Every step runs megatron's pipeline schedule (`get_forward_backward_func`): first the frozen reference
  model forward-only over the step's micro-batches (its per-token log-probs stay on the last stage), then
  the policy forward and backward. A micro-batch holds the chosen and rejected rows of the same pairs, so
  the DPO-family losses see both; the loss is computed on the last stage from vocabulary-parallel
  log-softmax (megatron's `vocab_parallel_cross_entropy`): full logits are never gathered.
- Gradients go through megatron's DistributedDataParallel and finalize_model_grads (data-parallel
  reduction, tied-embedding sync between first and last stage). With data parallel > 1 the optimizer is
  megatron's distributed optimizer (fp32 main weights and Adam moments sharded over the data-parallel
  ranks, gradients reduce-scattered); with DP = 1 its plain one (nothing to shard). Checkpoints gather the
  distributed state to DP rank 0 (get_parameter_state_dp_zero) and scatter it back on resume.
- Hugging Face weights are converted in on load (each rank reads only its slices) and out on export and
  save (gathered over tensor-parallel ranks, sent from later stages to rank 0): see convert.py.
- Collective methods (everything that touches weights or runs the model) must be called on every rank.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from refit_wire import DEFAULT_BUCKET_BYTES, pack_buckets

from ... import checkpoint_files, objective
from ...schedule import lr_at
from ...types import LossConfig, OptimConfig, TrainSample
from . import convert, hf_checkpoint
from .model import build, layer_spec, model_shape, transformer_config, transformer_engine_available

with warnings.catch_warnings():  # "Apex/Transformer Engine not installed, falling back": expected on CPU
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state, tensor_parallel

    from .cpu_compat import cuda_on_cpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

@dataclass
class _MicroBatch:
    """One micro-batch as every stage sees it (rows: chosen then rejected for pairs)."""

    input_ids: torch.Tensor  # [b, T-1]: the sequences without their last token
    position_ids: torch.Tensor
    labels: torch.Tensor  # [b, T-1]: the next tokens
    mask: torch.Tensor  # [b, T-1]: 1 where the label is a response token
    chunk: Sequence[TrainSample] = ()
    ref_logp: torch.Tensor | None = None  # the reference's per-token log-probs (last stage only)


class MegatronBackend:
    gathers_weights = True  # weights are sharded over tensor and pipeline ranks: exports and saves gather them
    live_weights = False  # named_weights converts megatron's fused layout to Hugging Face tensors

    def __init__(self, model_dir: str, optim: OptimConfig, *, device: str = "cpu", dtype: str = "float32",
                 rank: int = 0, world_size: int = 1, seed: int = 0, reference_dir: str | None = None,
                 tensor_parallel: int = 1, pipeline_parallel: int = 1):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"learner.dtype={dtype!r}: the megatron backend trains in float32 or bfloat16")
        if world_size % (tensor_parallel * pipeline_parallel):
            raise ValueError(f"{world_size} learner workers do not split into learner.tensor_parallel={tensor_parallel}"
                             f" x learner.pipeline_parallel={pipeline_parallel} model-parallel groups")
        torch.manual_seed(seed)
        # megatron overlaps tensor-parallel all-reduces with compute only with one CUDA connection (and warns
        # otherwise); it must be set before CUDA starts in this process.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        self.optim_cfg = optim
        self.rank, self.world_size = rank, world_size
        self.tp, self.pp = tensor_parallel, pipeline_parallel
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        if self.on_gpu:
            if self.device.index is None:  # "cuda": the device this process was given (Ray: its only one)
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        _join_process_group(rank, world_size, self.on_gpu)
        self.dtype = getattr(torch, dtype)
        # Kept in memory for saves: model_dir may be a checkpoint that is pruned while this run goes on.
        self.hf_config = AutoConfig.from_pretrained(model_dir)
        root = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir) if (root / "tokenizer_config.json").exists() else None
        self.generation_config = (GenerationConfig.from_pretrained(model_dir)
                                  if (root / "generation_config.json").exists() else None)
        self.shape = model_shape(self.hf_config, tensor_parallel, pipeline_parallel)
        self.transformer_engine = self.on_gpu and transformer_engine_available()
        self.rules = convert.rules(self.shape, self.transformer_engine)
        with cuda_on_cpu():
            _init_parallel_state(tensor_parallel, pipeline_parallel, seed)
            self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
            self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
            self.dp_rank = parallel_state.get_data_parallel_rank()
            self.dp_size = parallel_state.get_data_parallel_world_size()
            self.first_stage = parallel_state.is_pipeline_first_stage()
            self.last_stage = parallel_state.is_pipeline_last_stage()
            with warnings.catch_warnings():  # "Apex is not installed. Falling back to Torch Norm"
                warnings.simplefilter("ignore")
                spec = layer_spec(self.transformer_engine)
            policy = self._build(spec)
            self.layer_offset = policy.decoder.layers[0].layer_number - 1  # global index of this stage's first layer
            self.layers_here = len(policy.decoder.layers)
            self._load(policy, hf_checkpoint.SafetensorsReader(model_dir))
            self.reference = self._build(spec)
            if reference_dir is None:
                self.reference.load_state_dict(policy.state_dict())
            else:  # resuming mid-iteration: the reference is the iteration-start weights, not the policy's
                self._load(self.reference, hf_checkpoint.SafetensorsReader(reference_dir))
            self.reference.requires_grad_(False)
            # The distributed optimizer shards main weights and moments over data-parallel ranks; with one
            # there is nothing to shard and the plain optimizer keeps the same state.
            self.distributed_optimizer = self.dp_size > 1
            ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                       use_distributed_optimizer=self.distributed_optimizer)
            self.model = DistributedDataParallel(config=policy.config, ddp_config=ddp_config, module=policy)
            policy.config.no_sync_func = self.model.no_sync
            policy.config.finalize_model_grads_func = finalize_model_grads
            self.optimizer = self._new_optimizer()
        self.step = 0  # optimizer steps taken since the optimizer was (re)created

    # ---- training -------------------------------------------------------------------------------------

    def train_step(self, samples: Sequence[TrainSample], loss_cfg: LossConfig) -> dict[str, float]:
        """One optimizer step on this data-parallel rank's share of the global batch; metrics are global."""
        preference = objective.check_batch(samples)
        chunks = self._chunks(samples)
        micro = self._micro_batches([objective.batch_rows(c, preference) for c in chunks], chunks)
        if preference:
            self.reference.eval()
            refs = self._run(self.reference, micro, self._logprob_output, forward_only=True)
            for mb, ref in zip(micro, refs):  # empty except on the last stage
                mb.ref_logp = ref
        n_local, n_micro = len(samples), len(micro)

        def loss(mb: _MicroBatch, logits: torch.Tensor):
            total, stats = objective.micro_batch_loss(self._token_logprobs(logits, mb), mb.ref_logp, mb.mask,
                                                      mb.chunk, loss_cfg)
            # The schedule divides by the micro-batch count, so the gradients are of this rank's mean loss;
            # megatron's DDP then averages them over data-parallel ranks (equal shares): the global mean.
            return total.sum() * (n_micro / n_local), stats

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        stats = self._run(self.model, micro, loss, forward_only=False)
        lr = lr_at(self.step, self.optim_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = self._optimizer_step()
        self.step += 1
        return objective.step_metrics(self._sum_over_ranks(stats, len(objective.STATS)), lr, float(grad_norm),
                                      preference)

    def _token_logprobs(self, logits: torch.Tensor, mb: _MicroBatch) -> torch.Tensor:
        """Masked per-token log-probs from this rank's vocabulary slice of the logits [b, T-1, V/tp].

        megatron's vocabulary-parallel cross entropy (float32) all-reduces only the per-token max and sum of
        exponentials over the tensor-parallel group; padded vocabulary rows are masked out first.
        """
        logits = logits.float()
        pad = self.shape.padded_vocab - self.shape.vocab
        if pad and self.tp_rank == self.tp - 1:
            columns = torch.arange(logits.shape[-1], device=logits.device) >= logits.shape[-1] - pad
            logits = logits.masked_fill(columns, float("-inf"))
        return -tensor_parallel.vocab_parallel_cross_entropy(logits, mb.labels) * mb.mask

    def _logprob_output(self, mb: _MicroBatch, logits: torch.Tensor):
        return logits.new_zeros(()), self._token_logprobs(logits, mb).detach()

    # ---- evaluation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def sft_nll(self, samples: Sequence[TrainSample]) -> tuple[float, float]:
        """(sum of token NLL, token count) of the chosen responses over all data-parallel ranks' shares."""
        chunks = self._chunks(samples)
        micro = self._micro_batches([([s.prompt_ids for s in c], [s.chosen_ids for s in c]) for c in chunks])

        def nll(mb: _MicroBatch, logits: torch.Tensor):
            token_logp = self._token_logprobs(logits, mb)
            return logits.new_zeros(()), torch.stack([-token_logp.sum().double(), mb.mask.sum().double()]).cpu()

        self.model.eval()
        sums = self._sum_over_ranks(self._run(self.model, micro, nll, forward_only=True), 2)
        return float(sums[0]), float(sums[1])

    @torch.no_grad()
    def logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                 reference: bool = False) -> list[list[float]]:
        """Per-token log-probs of each response given its prompt, under the policy or the reference
        (returned on every rank of the pipeline)."""
        model = self.reference if reference else self.model
        model.eval()
        mb_size = max(1, self.optim_cfg.micro_batch_size)
        rows = [(prompts[i : i + mb_size], responses[i : i + mb_size]) for i in range(0, len(prompts), mb_size)]
        micro = self._micro_batches(rows)
        outputs = self._run(model, micro, self._logprob_output, forward_only=True)
        out = []
        for j, mb in enumerate(micro):
            token_logp = outputs[j] if self.last_stage else torch.empty(mb.mask.shape, device=self.device)
            if self.pp > 1:
                dist.broadcast(token_logp, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
            out += [row[m.bool()].tolist() for row, m in zip(token_logp.cpu(), mb.mask.cpu())]
        return out

    # ---- iteration boundaries ------------------------------------------------------------------------

    def update_reference(self) -> None:
        """The reference policy becomes the current weights (start of a new iteration)."""
        self.reference.load_state_dict(self.model.module.state_dict())

    def reset_optimizer(self) -> None:
        with cuda_on_cpu():
            self.optimizer = self._new_optimizer()
        self.step = 0

    # ---- weights out -----------------------------------------------------------------------------------

    @torch.no_grad()
    def named_weights(self):
        """The whole model under Hugging Face names, on global rank 0 (a tied lm_head is left out: it is
        the embedding). Collective: every rank must iterate it to the end; the others yield nothing.

        Each tensor is gathered over its stage's tensor-parallel ranks (data-parallel rank 0 only) and, from
        later pipeline stages, sent to rank 0.
        """
        params = dict(self.model.module.named_parameters())
        stage_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
        for rule in self.rules:
            owner = convert.owner_stage(rule, self.shape, self.pp)
            tensors = []
            if self.dp_rank == 0 and self.pp_rank == owner:
                local = params[self._local_names(rule)[0]].detach()
                tensors = convert.to_hf(rule, convert.unshard(rule, self._gather_tp(local)), self.shape)
            if owner == 0:
                if self.rank == 0:
                    yield from tensors
                continue
            if self.dp_rank == 0 and self.pp_rank == owner and self.tp_rank == 0:
                for _, tensor in tensors:
                    _send(tensor, dst=0)
            if self.rank == 0:
                for name in rule.hf:
                    yield name, _recv(src=stage_ranks[owner], dtype=self.dtype, device=self.device)

    def export_buckets(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[dict]:
        """Weight buckets for a refit (rank 0; the other ranks return [] after helping gather)."""
        return pack_buckets(self.named_weights(), bucket_bytes)

    def rng_state(self) -> dict:
        """This rank's random generators, megatron's tracked streams included."""
        state = {"torch": torch.get_rng_state(),
                 "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save(self, path: str, rng_states: list[dict] | None = None) -> None:
        """A Hugging Face checkpoint directory plus optimizer, schedule and RNG state, written atomically by
        rank 0 (`rng_states` holds every rank's). Collective."""
        weights = {name: t.detach().to("cpu", copy=True) for name, t in self.named_weights()}
        optimizer_states = self._gather_optimizer_states()
        if self.rank != 0:
            return
        with checkpoint_files.publish(path) as tmp:
            hf_checkpoint.write(tmp, weights, self.hf_config, self.generation_config, self.tokenizer)
            checkpoint_files.write_optimizer(tmp, {"step": self.step, "tensor_parallel": self.tp,
                                                   "pipeline_parallel": self.pp, "ranks": optimizer_states})
            checkpoint_files.write_rng_states(tmp, rng_states or [self.rng_state()])
            checkpoint_files.write_learner_state(tmp, step=self.step, world_size=self.world_size, backend="megatron",
                                                 tensor_parallel=self.tp, pipeline_parallel=self.pp)

    def load_training_state(self, path: str) -> None:
        """Optimizer moments, schedule position and this rank's RNG from a checkpoint written by `save`."""
        state = checkpoint_files.read_optimizer(path)
        if "ranks" not in state:
            raise ValueError(f"{path} was not written by the megatron backend: resume with the learner.backend "
                             "that wrote it")
        if (state["tensor_parallel"], state["pipeline_parallel"]) != (self.tp, self.pp):
            raise ValueError(f"{path} was written with learner.tensor_parallel={state['tensor_parallel']} and "
                             f"learner.pipeline_parallel={state['pipeline_parallel']}; this group has "
                             f"{self.tp} and {self.pp}: resume with the same layout")
        mine = checkpoint_files.read_rng_state(path, self.rank, self.world_size)
        blob = state["ranks"].get(f"tp{self.tp_rank}_pp{self.pp_rank}")
        if blob is not None:
            with cuda_on_cpu():
                _load_optimizer_state(self.optimizer, blob, self.dp_rank == 0)
        self.step = state["step"]
        checkpoint_files.set_rng_state(mine)
        tensor_parallel.get_cuda_rng_tracker().set_states(mine["tracker"])

    # ---- layout ----------------------------------------------------------------------------------------

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(this rank's data-parallel index, data-parallel size): which share of a batch it takes."""
        return self.dp_rank, self.dp_size

    def _build(self, spec):
        config = transformer_config(self.shape, tensor_parallel=self.tp, pipeline_parallel=self.pp,
                                    dtype=self.dtype, on_gpu=self.on_gpu)
        model = build(self.shape, config, spec, pre_process=self.first_stage, post_process=self.last_stage)
        # megatron's parallel layers allocate in params_dtype on the current device, but the local spec's norms
        # (torch's RMSNorm) are built in float32 on the CPU (unfused next to bf16 activations, and a float32
        # tensor among bf16 ones in checkpoints). Megatron-LM's training loop moves and casts the model; so
        # must we.
        return model.to(device=self.device, dtype=self.dtype)

    def _local_names(self, rule: convert.Rule) -> list[str]:
        """Names of this stage's parameters that hold `rule` (a tied embedding has a copy on the last stage)."""
        if rule.layer is not None:
            here = self.layer_offset <= rule.layer < self.layer_offset + self.layers_here
            return [convert.local_name(rule, self.layer_offset)] if here else []
        if rule.megatron.startswith("embedding."):
            names = [rule.megatron] if self.first_stage else []
            if self.shape.tied and self.last_stage and not self.first_stage:
                names.append("output_layer.weight")
            return names
        return [rule.megatron] if self.last_stage else []

    @torch.no_grad()
    def _load(self, module: torch.nn.Module, read) -> None:
        """Fill this stage's slice of the model from a Hugging Face checkpoint."""
        params = dict(module.named_parameters())
        filled = set()
        for rule in self.rules:
            names = self._local_names(rule)
            if names:
                local = convert.shard(rule, convert.to_megatron(rule, read, self.shape), self.tp_rank, self.tp)
                for name in names:
                    params[name].copy_(local)
                    filled.add(name)
        if filled != set(params):
            raise RuntimeError(f"conversion from {read.model_dir} left {sorted(set(params) - filled)} unset")

    def _gather_tp(self, local: torch.Tensor) -> list[torch.Tensor]:
        if self.tp == 1:
            return [local]
        shards = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        return shards

    # ---- running the model -----------------------------------------------------------------------------

    def _chunks(self, samples: Sequence[TrainSample]) -> list[Sequence[TrainSample]]:
        mb = max(1, self.optim_cfg.micro_batch_size)
        return [samples[i : i + mb] for i in range(0, len(samples), mb)]

    def _micro_batches(self, rows: list[tuple[list, list]], chunks=None) -> list[_MicroBatch]:
        out = []
        for j, (prompts, responses) in enumerate(rows):
            batch = objective.collate(prompts, responses, self.device)
            ids = batch["input_ids"]
            positions = torch.arange(ids.shape[1] - 1, device=self.device).expand(ids.shape[0], -1)
            out.append(_MicroBatch(ids[:, :-1], positions, ids[:, 1:], batch["mask"],
                                   chunks[j] if chunks is not None else ()))
        return out

    def _run(self, model, micro: list[_MicroBatch], output, forward_only: bool) -> list:
        """megatron's schedule over the micro-batches; returns `output(mb, logits)[1]` per micro-batch on the
        last stage ([] elsewhere). `output` returns (loss to backpropagate, what to keep)."""
        if not micro:
            return []

        def forward_step(data_iterator, module):
            mb = next(data_iterator)
            return module(mb.input_ids, mb.position_ids, None), functools.partial(output, mb)

        with cuda_on_cpu(), torch.set_grad_enabled(not forward_only):
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
                num_microbatches=len(micro), seq_length=max(m.input_ids.shape[1] for m in micro),
                micro_batch_size=max(m.input_ids.shape[0] for m in micro), forward_only=forward_only)

    def _sum_over_ranks(self, per_micro: list[torch.Tensor], size: int) -> torch.Tensor:
        """Sums from the last stage's micro-batches over every data-parallel rank (one tensor-parallel rank
        counts: they all hold the same values), equal on every rank."""
        sums = torch.zeros(size, dtype=torch.float64, device=self.device)
        if self.last_stage and self.tp_rank == 0:
            for values in per_micro:
                sums += values.to(sums)
        dist.all_reduce(sums)
        return sums.cpu()

    def _optimizer_step(self) -> float:
        """megatron's optimizer step with clipping done here: its own clip asserts CUDA tensors. The norm is
        megatron's (over tensor and pipeline ranks, each parameter counted once); the scaling is the same
        max_norm / (norm + 1e-6) as torch.nn.utils.clip_grad_norm_."""
        with cuda_on_cpu():
            self.optimizer.prepare_grads()  # main gradients from the DDP buffers (no loss scaling in bf16/fp32)
            grad_norm = float(self.optimizer.get_grad_norm())
            max_norm = self.optim_cfg.max_grad_norm
            if max_norm > 0 and grad_norm + 1e-6 > max_norm:
                for param in _inner(self.optimizer).get_parameters():
                    if param.grad is not None:
                        param.grad.mul_(max_norm / (grad_norm + 1e-6))
            self.optimizer.step_with_ready_grads()
        return grad_norm

    def _new_optimizer(self):
        c = self.optim_cfg
        config = OptimizerConfig(
            optimizer="adam", lr=c.lr, min_lr=c.min_lr, weight_decay=c.weight_decay, adam_beta1=c.betas[0],
            adam_beta2=c.betas[1], adam_eps=c.eps, clip_grad=0.0, bf16=self.dtype == torch.bfloat16,
            params_dtype=self.dtype, use_distributed_optimizer=self.distributed_optimizer)
        # config_overrides={} decays every parameter, norms included, as the torch backend's AdamW does.
        return get_megatron_optimizer(config, [self.model], config_overrides={})

    def _gather_optimizer_states(self) -> dict:
        """Every model-parallel rank's optimizer state (from data-parallel rank 0), on global rank 0."""
        state = _optimizer_state(self.optimizer) if self.step > 0 else None  # nothing to keep before a step
        mine = (f"tp{self.tp_rank}_pp{self.pp_rank}", state) if self.dp_rank == 0 and state is not None else None
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        return dict(g for g in gathered if g is not None) if self.rank == 0 else {}


# ---- process-wide setup ------------------------------------------------------------------------------------


def _join_process_group(rank: int, world_size: int, on_gpu: bool) -> None:
    """megatron needs torch.distributed even for one rank; the learner group joins it for more."""
    if dist.is_initialized():
        return
    if world_size != 1:
        raise RuntimeError("join the torch.distributed group before creating a multi-rank megatron backend")
    # One rank meets only itself: an in-process store, no port to pick.
    dist.init_process_group("nccl" if on_gpu else "gloo", store=dist.HashStore(), rank=rank, world_size=1)


def _init_parallel_state(tp: int, pp: int, seed: int) -> None:
    """megatron's parallel state is process-wide: set once; a second backend in the process must agree."""
    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            raise RuntimeError(f"this process already runs megatron with tensor/pipeline parallel sizes {have}, "
                               f"not {(tp, pp)}")
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# ---- tensors and states between ranks ----------------------------------------------------------------------

_MAX_DIMS = 8


def _send(tensor: torch.Tensor, dst: int) -> None:
    header = torch.zeros(_MAX_DIMS + 1, dtype=torch.long, device=tensor.device)
    header[0] = tensor.dim()
    header[1 : 1 + tensor.dim()] = torch.tensor(tensor.shape)
    dist.send(header, dst)
    dist.send(tensor.contiguous(), dst)


def _recv(src: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    header = torch.zeros(_MAX_DIMS + 1, dtype=torch.long, device=device)
    dist.recv(header, src)
    tensor = torch.empty(header[1 : 1 + int(header[0])].tolist(), dtype=dtype, device=device)
    dist.recv(tensor, src)
    return tensor


def _inner(optimizer):
    """The one optimizer inside megatron's ChainedOptimizer (dense parameters only: no experts here)."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(inner) != 1:
        raise RuntimeError(f"expected one megatron optimizer, found {len(inner)}")
    return inner[0]


def _optimizer_state(optimizer) -> dict:
    inner = _inner(optimizer)
    state = {"optimizer": _to_cpu(inner.state_dict())}
    if hasattr(inner, "get_parameter_state_dp_zero"):  # distributed: moments are sharded over data parallel
        state["parameters"] = _to_cpu(inner.get_parameter_state_dp_zero())
        state["adam_step"] = _adam_step(inner)
    return state


def _load_optimizer_state(optimizer, state: dict, data_rank_zero: bool) -> None:
    inner = _inner(optimizer)
    inner.load_state_dict(state["optimizer"])
    if hasattr(inner, "load_parameter_state_from_dp_zero"):
        # megatron-core 0.16.1 restores exactly param, exp_avg and exp_avg_sq per main parameter and fails on
        # any other per-parameter state (KeyError): torch's Adam, its optimizer without Apex or Transformer
        # Engine, also keeps `step` there. The step travels beside the gathered state and is put back here.
        entries = [inner.optimizer.state[p] for group in inner.optimizer.param_groups for p in group["params"]]
        for entry in entries:
            entry.pop("step", None)
        # It copies into the float32 main parameters in place: leaves that require grad (Megatron-LM's loader
        # runs it with autograd off too).
        with torch.no_grad():
            inner.load_parameter_state_from_dp_zero(state["parameters"] if data_rank_zero else None)
        for entry in entries:
            entry["step"] = state["adam_step"].clone()


def _adam_step(inner) -> torch.Tensor:
    """torch Adam's step count, one for all parameters (each DP rank holds other parameters' shards, so the
    count is saved once): every parameter takes every step here."""
    steps = {float(s["step"]) for s in inner.optimizer.state.values() if "step" in s}
    if len(steps) != 1:
        raise RuntimeError(f"expected one Adam step count over the parameters, found {sorted(steps)}")
    return torch.tensor(steps.pop())


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
