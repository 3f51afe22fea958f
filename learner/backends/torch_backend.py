"""The `torch` learner backend: a transformers causal LM, data parallel, AdamW.

One instance per data-parallel rank. Data parallel (`sharding`, the config's `learner.sharding`):
- ddp (the default): every rank holds the whole model, its gradients and AdamW state; gradients are
  all-reduced (DDP in float32, one flat all-reduce of the float32 master gradients in mixed precision).
- fsdp2: parameters, gradients and AdamW state sharded over the ranks with FSDP2 (learner/backends/fsdp.py).
  Collective like megatron (`gathers_weights`): every rank takes part in exports and saves, which gather the
  full weights one tensor at a time. With one worker there is nothing to shard: it runs as ddp does.
 With world_size > 1 the caller has already joined the
torch.distributed group (gloo on CPU, NCCL on GPUs); per-step metrics are summed over ranks, so every rank
returns the same numbers. Works with world_size == 1 and no process group too (the toy bootstrap trains this
way in-process).

Precision (`dtype`, the config's `learner.dtype`):
- float32: weights, gradients and AdamW state in float32; forward and backward in float32 (the CPU default,
  unchanged). Data parallel through DDP.
- bfloat16: mixed precision. The model holds bfloat16 weights and runs forward and backward in bfloat16 (as
  FSDP2's MixedPrecisionPolicy(param_dtype=bfloat16) and Megatron's bf16 do); a float32 master copy of every
  weight takes the gradients (accumulated over micro-batches in float32, all-reduced in float32), the clipping
  and the AdamW step, and is rounded back into the model once per step. Checkpoints hold the float32 master
  weights; exported (refit) weights are the bfloat16 ones the model computes with. The reference model is a
  bfloat16 copy, so policy and reference give identical log-probs at an iteration's start.
- float16 is refused: without loss scaling its gradients underflow.
Log-probs are reduced in float32 in every mode (losses.token_logprobs). Under fsdp2, bfloat16 keeps the same
split: the float32 shards are the masters, FSDP gathers them cast to bfloat16 and reduces gradients in float32.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.utils import logging as hf_logging

from refit_wire import DEFAULT_BUCKET_BYTES, pack_buckets

from .. import checkpoint_files, losses, objective
from . import fsdp
from ..schedule import lr_at
from ..types import LossConfig, OptimConfig, TrainSample

DTYPES = ("float32", "bfloat16")
# Architectures whose logits are exactly lm_head(final hidden state) (no scaling or soft-capping in the
# CausalLM head): for these the head runs only on the positions whose log-prob the loss uses.
_PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# RMSNorms computing weight * (x * rsqrt(mean(x^2) + eps)): on CUDA they run as one fused kernel.
_PLAIN_RMSNORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# Architectures whose attention is exactly causal (no sliding window): they run _causal_sdpa.
_CAUSAL_ATTENTION_MODELS = frozenset({"llama"})
_CAUSAL_SDPA = "selfreward_causal_sdpa"
_FLAT_ALIGN = 256  # elements; see _MasterWeights


def _causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with the causal mask alone. The learner's batches are right-padded, so under
    the causal mask no real token attends to a pad: no padding mask is needed, SDPA runs its flash kernel with
    grouped KV heads, and, registered under its own name, transformers builds no mask at all (its mask
    preparation reads a device value on the host, a sync per forward)."""
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


AttentionInterface.register(_CAUSAL_SDPA, _causal_sdpa)

# SDPA kernels in order of preference on CUDA, with whether each is enabled now. Flash first: policy (training)
# and reference (no-grad) forwards then run the same kernel and agree to rounding at an iteration's start
# (measured on an H200: not bit for bit); cuDNN, which torch may prefer on Hopper, need not round its training
# and inference forwards alike.
_SDPA_PRIORITY = [(SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled),
                  (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled),
                  (SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled),
                  (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled)]


def _sdpa_priority():
    """Our kernel preference among the SDPA backends enabled now (a caller's restriction stays in force)."""
    return sdpa_kernel([b for b, enabled in _SDPA_PRIORITY if enabled()], set_priority=True)


class TorchBackend:
    gathers_weights = False  # with ddp rank 0 holds the full weights; an fsdp2 instance sets True
    live_weights = True  # named_weights yields the model's own tensors (fsdp2: gathered copies, so False)

    def __init__(self, model_dir: str, optim: OptimConfig, *, device: str = "cpu", dtype: str = "float32",
                 rank: int = 0, world_size: int = 1, seed: int = 0, reference_dir: str | None = None,
                 sharding: str = "ddp", kernels: str = "auto"):
        if dtype not in DTYPES:
            hint = " (float16 would need loss scaling; bfloat16 is as fast)" if dtype == "float16" else ""
            raise ValueError(f"learner.dtype={dtype!r} is not supported by the torch learner{hint}; "
                             f"use one of {', '.join(DTYPES)}")
        if sharding not in fsdp.SHARDINGS:
            raise ValueError(f"learner.sharding={sharding!r} is not one of: {', '.join(fsdp.SHARDINGS)}")
        if kernels not in KERNELS:
            raise ValueError(f"learner.kernels={kernels!r} is not one of: {', '.join(KERNELS)}")
        if kernels != "torch":  # liger must fit; auto takes it where it fits (faster: benchmarks/NOTES.md)
            unfit = _liger_unfit(device, AutoConfig.from_pretrained(model_dir).model_type)
            if unfit and kernels == "liger":
                raise ValueError(f"learner.kernels=liger {unfit}: use learner.kernels=torch")
            kernels = "torch" if unfit else "liger"
        self.kernels = kernels  # what runs: torch or liger
        torch.manual_seed(seed)
        hf_logging.disable_progress_bar()  # per-load bars from every worker would drown the step lines
        self.model_dir = model_dir
        # Kept in memory for saves: model_dir may be a checkpoint that is pruned while this run goes on.
        has_tokenizer = (Path(model_dir) / "tokenizer_config.json").exists()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir) if has_tokenizer else None
        self.optim_cfg = optim
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.dtype = getattr(torch, dtype)
        self.sharded = sharding == "fsdp2" and world_size > 1
        self.gathers_weights = self.sharded
        self.live_weights = not self.sharded
        model = self._load(model_dir, torch.float32)
        if self.sharded:
            self._shard(model, reference_dir or model_dir)
            self.optimizer = self._new_optimizer()
            self.step = 0
            return
        # Mixed precision: the model's weights become bf16 views of one flat buffer, the masters stay float32.
        self.master = _MasterWeights(model, self.dtype) if self.dtype != torch.float32 else None
        self.module = model  # unwrapped: HF names, saving, export
        if reference_dir is None:
            self.reference = self._frozen_copy(model)
        else:  # resuming mid-iteration: the reference is the iteration-start weights, not the policy's
            self.reference = self._frozen_copy(self._load(reference_dir, self.dtype))
        if self.master is not None:
            self.master.track_gradients()  # after the reference copy, which must not carry the hooks
        self.policy = _ResponseLogprobs(model)
        self.reference_logprobs = _ResponseLogprobs(self.reference)
        self.model = self.policy  # what train_step runs: DDP's wrapper when it reduces the gradients
        if world_size > 1 and self.master is None:
            self.model = torch.nn.parallel.DistributedDataParallel(self.policy)
        self.optimizer = self._new_optimizer()
        self.step = 0  # optimizer steps taken since the optimizer was (re)created

    def _shard(self, model: torch.nn.Module, reference_dir: str) -> None:
        """FSDP2: the float32 policy and a reference in the compute dtype, each sharded over the ranks."""
        mesh = fsdp.data_parallel_mesh(self.device)
        self.master = None  # FSDP's float32 shards are the masters
        self.module = model
        self.policy = _ResponseLogprobs(model)
        fsdp.shard(self.policy, model, mesh, self.dtype)
        self.reference = self._load(reference_dir, self.dtype)  # the same weights as model_dir's, or the resumed
        self.reference.requires_grad_(False)  # iteration's start
        self.reference.eval()
        self.reference_logprobs = _ResponseLogprobs(self.reference)
        fsdp.shard(self.reference_logprobs, self.reference, mesh, self.dtype)
        self.model = self.policy

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(this rank's data-parallel index, data-parallel size): every rank takes its own share."""
        return self.rank, self.world_size

    def _load(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        causal = AutoConfig.from_pretrained(path).model_type in _CAUSAL_ATTENTION_MODELS
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     attn_implementation=_CAUSAL_SDPA if causal else "sdpa")
        model = model.to(self.device)
        if self.kernels == "liger":  # every model this backend loads (policy and reference) computes alike
            _apply_liger(model)
        elif self.device.type == "cuda":
            _fuse_rms_norms(model)
        return model

    # ---- training -------------------------------------------------------------------------------------

    def train_step(self, samples: Sequence[TrainSample], loss_cfg: LossConfig) -> dict[str, float]:
        """One optimizer step on this rank's share of the global batch; metrics are global."""
        sums, grad_norm, lr, preference = self._step(samples, loss_cfg)
        values = torch.cat([sums, grad_norm.reshape(1).to(sums.dtype)]).tolist()  # the step's one host sync
        return objective.step_metrics(values[:-1], lr, values[-1], preference)

    def _step(self, samples: Sequence[TrainSample], loss_cfg: LossConfig):
        """The step's device work, queued without waiting on the device: (stat sums, grad norm) stay tensors."""
        preference = objective.check_batch(samples)
        self.model.train()
        if self.master is not None:
            self.master.zero_grad()
        mb = self.optim_cfg.micro_batch_size
        chunks = [samples[i : i + mb] for i in range(0, len(samples), mb)]
        sums = torch.zeros(len(objective.STATS), dtype=torch.float64, device=self.device)
        ddp = self.model is not self.policy
        for j, chunk in enumerate(chunks):
            sync_now = j == len(chunks) - 1
            ctx = self.model.no_sync() if (ddp and not sync_now) else contextlib.nullcontext()
            with ctx:
                loss_sum, stats = self._micro_step(chunk, loss_cfg, preference)
                # Divide by the local pair count: averaging over equal shards then gives the global mean.
                (loss_sum / len(samples)).backward()
            sums += stats
        if self.master is not None and self.world_size > 1:
            self.master.all_reduce_mean_gradients()
        lr = lr_at(self.step, self.optim_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        if self.master is None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.master.copy_to_model()
        self.step += 1
        self._all_reduce(sums)
        return sums, grad_norm, lr, preference

    def _micro_step(self, chunk: Sequence[TrainSample], cfg: LossConfig, preference: bool):
        batch = objective.collate(*objective.batch_rows(chunk, preference), self.device)
        token_logp = _token_logprobs(self.model, batch)
        ref_logp = None
        if preference:  # chosen and rejected ran as one batch above; the reference runs the same batch
            with torch.no_grad():
                ref_logp = _token_logprobs(self.reference_logprobs, batch)
        total, stats = objective.micro_batch_loss(token_logp, ref_logp, batch["mask"], chunk, cfg)
        return total.sum(), stats

    def _clip_gradients(self) -> torch.Tensor:
        max_norm = self.optim_cfg.max_grad_norm
        if self.master is not None:
            return self.master.clip_gradients(max_norm)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return norm.full_tensor() if isinstance(norm, fsdp.DTensor) else norm  # fsdp2: reduced over the shards

    # ---- evaluation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def sft_nll(self, samples: Sequence[TrainSample]) -> tuple[float, float]:
        """(sum of token NLL, token count) of the chosen responses over all ranks' shares."""
        self.policy.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        mb = max(1, self.optim_cfg.micro_batch_size)
        chunks = [samples[i : i + mb] for i in range(0, len(samples), mb)]
        # Shares may be uneven here (LearnerGroup.sft_nll); under fsdp2 every forward all-gathers, so a rank
        # with fewer micro-batches runs one-token forwards (not counted) until all have run as many.
        forwards = fsdp.same_forward_count(len(chunks), self.device) if self.sharded else len(chunks)
        for chunk in chunks:
            batch = objective.collate([s.prompt_ids for s in chunk], [s.chosen_ids for s in chunk], self.device)
            token_logp = _token_logprobs(self.policy, batch)
            sums[0] -= token_logp.sum().double()
            sums[1] += batch["mask"].sum().double()
        for _ in range(forwards - len(chunks)):
            _token_logprobs(self.policy, objective.collate([[0]], [[0]], self.device))
        self._all_reduce(sums)
        total, count = sums.tolist()
        return total, count

    @torch.no_grad()
    def logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                 reference: bool = False) -> list[list[float]]:
        """Per-token log-probs of each response given its prompt, under the policy or the reference."""
        runner = self.reference_logprobs if reference else self.policy
        runner.eval()
        batch = objective.collate(prompts, responses, self.device)
        token_logp = _token_logprobs(runner, batch).cpu()
        mask = batch["mask"].cpu()
        return [row[m.bool()].tolist() for row, m in zip(token_logp, mask)]

    # ---- iteration boundaries ------------------------------------------------------------------------

    def update_reference(self) -> None:
        """The reference policy becomes the current weights (start of a new iteration)."""
        if self.sharded:
            fsdp.copy_shards(self.reference, self.module)
        else:
            self.reference.load_state_dict(self.module.state_dict())

    def reset_optimizer(self) -> None:
        self.optimizer = self._new_optimizer()
        self.step = 0

    # ---- weights out -----------------------------------------------------------------------------------

    def named_weights(self):
        """Parameters under Hugging Face names, as the model computes with them (bfloat16 in mixed precision);
        a tied lm_head is left out (it is the embedding). Under fsdp2 collective: rank 0 yields each tensor
        gathered in the compute dtype, one at a time; the other ranks yield nothing."""
        tied = getattr(self.module.config, "tie_word_embeddings", False)
        named = (fsdp.gathered_weights(self.module, self.rank, self.dtype) if self.sharded
                 else self.module.state_dict().items())
        for name, tensor in named:
            if tied and name == "lm_head.weight":
                continue
            yield name, tensor

    def export_buckets(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[dict]:
        return pack_buckets(self.named_weights(), bucket_bytes)

    def rng_state(self) -> dict:
        """This rank's random generators (part of a checkpoint, so a resumed run draws the same numbers)."""
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save(self, path: str, rng_states: list[dict] | None = None) -> None:
        """Write a Hugging Face checkpoint directory plus optimizer, schedule and RNG state, atomically
        (rank 0 only; `rng_states` holds every rank's). In mixed precision the weights written are the float32
        masters, so a resumed run continues from exactly the weights the optimizer holds. Under fsdp2
        collective: weights (float32) and optimizer state are gathered to rank 0's CPU, one tensor at a time, and
        written unsharded, in the files and layout ddp writes."""
        if self.sharded:
            weights = dict(fsdp.gathered_weights(self.module, self.rank, to_cpu=True))
            optimizer_state = fsdp.gather_optimizer_state(self.optimizer, self.rank)
        else:
            optimizer_state = self.optimizer.state_dict() if self.rank == 0 else None
        if self.rank != 0:
            return
        with checkpoint_files.publish(path) as tmp:
            if self.sharded:
                self.module.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
                _set_config_dtype(tmp, "float32")
            elif self.master is None:
                self.module.save_pretrained(tmp, safe_serialization=True)
            else:
                self.module.save_pretrained(tmp, safe_serialization=True,
                                            state_dict=self.master.state_dict(self.module))
                _set_config_dtype(tmp, "float32")  # save_pretrained records the model's (bf16) dtype
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            checkpoint_files.write_optimizer(tmp, {"optimizer": optimizer_state, "step": self.step})
            checkpoint_files.write_rng_states(tmp, rng_states or [self.rng_state()])
            checkpoint_files.write_learner_state(tmp, step=self.step, world_size=self.world_size)

    def load_training_state(self, path: str) -> None:
        """Optimizer moments, schedule position and this rank's RNG from a checkpoint written by `save`."""
        state = checkpoint_files.read_optimizer(path, mmap=self.sharded)  # fsdp2: each rank reads its chunks
        if "optimizer" not in state:
            raise ValueError(f"{path} was not written by the torch backend: resume with the learner.backend "
                             "that wrote it")
        if self.sharded:
            fsdp.load_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        checkpoint_files.set_rng_state(checkpoint_files.read_rng_state(path, self.rank, self.world_size))

    # ---- helpers -------------------------------------------------------------------------------------

    def _new_optimizer(self) -> torch.optim.Optimizer:
        c = self.optim_cfg
        params = self.master.params if self.master is not None else self.module.parameters()
        # One fused kernel over all weights on CUDA; the CPU keeps the default implementation.
        fused = True if self.device.type == "cuda" else None
        return torch.optim.AdamW(params, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay,
                                 fused=fused)

    @staticmethod
    def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
        ref = copy.deepcopy(model)
        ref.requires_grad_(False)
        ref.eval()
        return ref

    def _all_reduce(self, t: torch.Tensor) -> None:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


class _MasterWeights:
    """float32 master weights and gradients behind a model that computes in a lower precision.

    The model's parameters are re-pointed at one flat low-precision buffer, and the masters are views of one
    flat float32 buffer (one all-reduce, one norm, one copy back per step). As soon as autograd has
    accumulated a parameter's gradient for a micro-batch, a hook adds it into the float32 gradient and frees
    it, so micro-batches sum in float32.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.model_params = list(model.parameters())  # tied weights appear once
        # Each weight starts on a 256-element boundary (512 bytes in bf16, as the caching allocator aligns its
        # blocks): matmul kernels are chosen by pointer alignment. The gaps stay zero in weights and gradients.
        offsets, total = [], 0
        for p in self.model_params:
            offsets.append(total)
            total += -(-p.numel() // _FLAT_ALIGN) * _FLAT_ALIGN
        device = self.model_params[0].device
        self.flat = torch.zeros(total, dtype=torch.float32, device=device)
        self.flat_grad = torch.zeros_like(self.flat)
        self.flat_model = torch.zeros(total, dtype=dtype, device=device)
        self.params: list[torch.nn.Parameter] = []
        for p, offset in zip(self.model_params, offsets):
            n = p.numel()
            self.flat[offset : offset + n].copy_(p.detach().reshape(-1))
            master = torch.nn.Parameter(self.flat[offset : offset + n].view_as(p))
            master.grad = self.flat_grad[offset : offset + n].view_as(p)
            self.flat_model[offset : offset + n].copy_(master.detach().reshape(-1))
            p.data = self.flat_model[offset : offset + n].view_as(p)
            self.params.append(master)

    def track_gradients(self) -> None:
        for p, master in zip(self.model_params, self.params):
            p.register_post_accumulate_grad_hook(_AccumulateInto(master.grad))

    def zero_grad(self) -> None:
        self.flat_grad.zero_()

    def all_reduce_mean_gradients(self) -> None:
        dist.all_reduce(self.flat_grad, op=dist.ReduceOp.SUM)
        self.flat_grad.div_(dist.get_world_size())

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Total gradient norm; with max_norm > 0 the gradients are scaled to at most that (as clip_grad_norm_)."""
        norm = torch.linalg.vector_norm(self.flat_grad)
        if max_norm > 0:
            self.flat_grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def copy_to_model(self) -> None:
        self.flat_model.copy_(self.flat)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with float32 master weights (on the CPU, one tensor per weight; tied names
        share one tensor so that save_pretrained writes it once)."""
        master_of = {id(p): m for p, m in zip(self.model_params, self.params)}
        out, copies = {}, {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) not in copies:
                source = master_of.get(id(tensor), tensor)
                copies[id(tensor)] = source.detach().cpu().clone()
            out[name] = copies[id(tensor)]
        return out


class _AccumulateInto:
    """Post-accumulate-grad hook: add the parameter's low-precision gradient into its float32 master gradient."""

    def __init__(self, master_grad: torch.Tensor):
        self.master_grad = master_grad

    def __call__(self, param: torch.Tensor) -> None:
        self.master_grad.add_(param.grad)
        param.grad = None


class _ResponseLogprobs(torch.nn.Module):
    """log p(label) at a batch's response positions under a causal LM: the forward the learner runs (and the
    module DDP wraps, so that its forward is the whole computation)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.split_head = getattr(lm.config, "model_type", None) in _PLAIN_HEAD_MODELS

    def forward(self, input_ids: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # No attention mask: the batch is right-padded, so under the causal mask no real token sees a pad.
        with _sdpa_priority() if input_ids.is_cuda else contextlib.nullcontext():
            if self.split_head:  # the head only on the rows the loss uses (prompt positions are skipped)
                hidden = self.lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
                logits = self.lm.get_output_embeddings()(hidden.flatten(0, 1).index_select(0, rows))
            else:
                logits = self.lm(input_ids=input_ids, use_cache=False).logits.flatten(0, 1).index_select(0, rows)
        return losses.token_logprobs(logits, labels)


def _token_logprobs(runner: torch.nn.Module, batch: dict) -> torch.Tensor:
    """[B, T-1] log-probs aligned with batch["mask"] (zero off the response)."""
    values = runner(batch["input_ids"], batch["rows"], batch["labels"])
    mask = batch["mask"]
    return values.new_zeros(mask.numel()).index_copy(0, batch["index"], values).view_as(mask)


def _fused_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


KERNELS = ("auto", "torch", "liger")
_LIGER_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # each has an apply_liger_kernel_to_<type>


def _apply_liger(model: torch.nn.Module) -> None:
    """Liger Kernel's Triton RoPE, RMSNorm and SwiGLU in the model instance (and transformers' module functions);
    the loss path stays ours (the head runs on response positions only)."""
    from liger_kernel import transformers as liger

    patch = getattr(liger, f"apply_liger_kernel_to_{model.config.model_type}")
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)


def _liger_unfit(device: str, model_type: str) -> str:
    """Why Liger Kernel cannot run here ("" where it can): it needs a GPU, the package, an architecture it patches."""
    if torch.device(device).type != "cuda":
        return f"runs Liger Kernel's Triton kernels, which need a GPU; this learner is on {device}"
    if model_type not in _LIGER_MODELS:
        return f"patches {', '.join(sorted(_LIGER_MODELS))} models, not {model_type!r}"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        return f"needs Liger Kernel ({e}): pip install liger-kernel"
    return ""


def _fuse_rms_norms(model: torch.nn.Module) -> None:
    """Run the model's Llama-style RMSNorms as torch's fused kernel (one pass forward, one backward, instead of
    about seven elementwise kernels). Differs from transformers' version only in rounding: the weight is applied
    before the result is rounded to bf16 instead of after."""
    for module in model.modules():
        if type(module).__name__ in _PLAIN_RMSNORMS:
            module.forward = _fused_rms_norm_forward.__get__(module)


def _set_config_dtype(path: Path, dtype: str) -> None:
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = dtype
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
