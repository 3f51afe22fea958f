"""The `torch` learner backend: a transformers causal LM, data parallel, AdamW.

One instance per data-parallel rank. With world_size > 1 the caller has already joined the
torch.distributed group (gloo on CPU); the model is wrapped in DDP and per-step metrics are summed over
ranks, so every rank returns the same numbers. Works with world_size == 1 and no process group too
(the toy bootstrap trains this way in-process).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .. import losses, objective
from ..export import DEFAULT_BUCKET_BYTES, pack_buckets
from ..schedule import lr_at
from ..types import LossConfig, OptimConfig, TrainSample

OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


class TorchBackend:
    def __init__(self, model_dir: str, optim: OptimConfig, *, device: str = "cpu", dtype: str = "float32",
                 rank: int = 0, world_size: int = 1, seed: int = 0, reference_dir: str | None = None):
        torch.manual_seed(seed)
        hf_logging.disable_progress_bar()  # per-load bars from every worker would drown the step lines
        self.model_dir = model_dir
        # Kept in memory for saves: model_dir may be a checkpoint that is pruned while this run goes on.
        has_tokenizer = (Path(model_dir) / "tokenizer_config.json").exists()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir) if has_tokenizer else None
        self.optim_cfg = optim
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device)
        self.module = model  # unwrapped: HF names, saving, export
        self.model = model
        if world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(model)
        if reference_dir is None:
            self.reference = self._frozen_copy(model)
        else:  # resuming mid-iteration: the reference is the iteration-start weights, not the policy's
            reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=getattr(torch, dtype))
            self.reference = self._frozen_copy(reference.to(self.device))
        self.optimizer = self._new_optimizer()
        self.step = 0  # optimizer steps taken since the optimizer was (re)created

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(this rank's data-parallel index, data-parallel size): every rank takes its own share."""
        return self.rank, self.world_size

    # ---- training -------------------------------------------------------------------------------------

    def train_step(self, samples: Sequence[TrainSample], loss_cfg: LossConfig) -> dict[str, float]:
        """One optimizer step on this rank's share of the global batch; metrics are global."""
        preference = objective.check_batch(samples)
        self.model.train()
        mb = self.optim_cfg.micro_batch_size
        chunks = [samples[i : i + mb] for i in range(0, len(samples), mb)]
        sums = torch.zeros(len(objective.STATS), dtype=torch.float64)
        for j, chunk in enumerate(chunks):
            sync_now = j == len(chunks) - 1
            ctx = self.model.no_sync() if (self.world_size > 1 and not sync_now) else contextlib.nullcontext()
            with ctx:
                loss_sum, stats = self._micro_step(chunk, loss_cfg, preference)
                # Divide by the local pair count: DDP then averages over equal shards -> global mean.
                (loss_sum / len(samples)).backward()
            sums += stats
        lr = lr_at(self.step, self.optim_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._all_reduce(sums)
        return objective.step_metrics(sums, lr, grad_norm, preference)

    def _micro_step(self, chunk: Sequence[TrainSample], cfg: LossConfig, preference: bool):
        batch = objective.collate(*objective.batch_rows(chunk, preference), self.device)
        token_logp = self._token_logprobs(self.model, batch)
        ref_logp = None
        if preference:
            with torch.no_grad():
                ref_logp = self._token_logprobs(self.reference, batch)
        total, stats = objective.micro_batch_loss(token_logp, ref_logp, batch["mask"], chunk, cfg)
        return total.sum(), stats

    @staticmethod
    def _token_logprobs(model, batch) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return losses.sequence_logprobs(logits[:, :-1], batch["input_ids"][:, 1:], batch["mask"])

    def _clip_gradients(self) -> float:
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.optim_cfg.max_grad_norm if self.optim_cfg.max_grad_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # ---- evaluation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def sft_nll(self, samples: Sequence[TrainSample]) -> tuple[float, float]:
        """(sum of token NLL, token count) of the chosen responses over all ranks' shares."""
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        mb = max(1, self.optim_cfg.micro_batch_size)
        for i in range(0, len(samples), mb):
            chunk = samples[i : i + mb]
            batch = objective.collate([s.prompt_ids for s in chunk], [s.chosen_ids for s in chunk], self.device)
            token_logp = self._token_logprobs(self.module, batch)
            sums[0] -= token_logp.sum().double()
            sums[1] += batch["mask"].sum().double()
        self._all_reduce(sums)
        return float(sums[0]), float(sums[1])

    @torch.no_grad()
    def logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                 reference: bool = False) -> list[list[float]]:
        """Per-token log-probs of each response given its prompt, under the policy or the reference."""
        model = self.reference if reference else self.module
        model.eval()
        batch = objective.collate(prompts, responses, self.device)
        token_logp = self._token_logprobs(model, batch)
        out = []
        for row, mask in zip(token_logp, batch["mask"]):
            out.append(row[mask.bool()].tolist())
        return out

    # ---- iteration boundaries ------------------------------------------------------------------------

    def update_reference(self) -> None:
        """The reference policy becomes the current weights (start of a new iteration)."""
        self.reference.load_state_dict(self.module.state_dict())

    def reset_optimizer(self) -> None:
        self.optimizer = self._new_optimizer()
        self.step = 0

    # ---- weights out -----------------------------------------------------------------------------------

    def named_weights(self):
        """Parameters under Hugging Face names; a tied lm_head is left out (it is the embedding)."""
        tied = getattr(self.module.config, "tie_word_embeddings", False)
        for name, tensor in self.module.state_dict().items():
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
        (rank 0 only; `rng_states` holds every rank's)."""
        if self.rank != 0:
            return
        final = Path(path)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.module.save_pretrained(tmp, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step}, tmp / OPTIMIZER_FILE)
        torch.save(rng_states or [self.rng_state()], tmp / RNG_FILE)
        with open(tmp / "learner_state.json", "w") as f:
            json.dump({"step": self.step, "world_size": self.world_size}, f)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def load_training_state(self, path: str) -> None:
        """Optimizer moments, schedule position and this rank's RNG from a checkpoint written by `save`."""
        state = torch.load(Path(path) / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        rngs = torch.load(Path(path) / RNG_FILE, map_location="cpu", weights_only=False)
        if len(rngs) != self.world_size:
            raise ValueError(f"{path} holds RNG states of {len(rngs)} learner ranks, this group has "
                             f"{self.world_size}: resume with the same cluster.learner.workers")
        torch.set_rng_state(rngs[self.rank]["torch"])
        if "cuda" in rngs[self.rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rngs[self.rank]["cuda"])

    # ---- helpers -------------------------------------------------------------------------------------

    def _new_optimizer(self) -> torch.optim.Optimizer:
        c = self.optim_cfg
        return torch.optim.AdamW(self.module.parameters(), lr=c.lr, betas=c.betas, eps=c.eps,
                                 weight_decay=c.weight_decay)

    @staticmethod
    def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
        ref = copy.deepcopy(model)
        ref.requires_grad_(False)
        ref.eval()
        return ref

    def _all_reduce(self, t: torch.Tensor) -> None:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

