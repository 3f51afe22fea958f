"""What one micro-batch contributes to a training step, shared by the learner backends.

Both backends turn token log-probs into the loss of SPEC section 6 (through `losses`) and into the per-step
sums behind the metrics in exactly the same way; only how they obtain the log-probs differs.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import losses
from .types import LossConfig, TrainSample

# Order of the per-step sums that backends reduce across ranks before `step_metrics`.
STATS = ("pairs", "loss", "preference_loss", "sft_loss", "acc", "r_chosen", "r_rejected", "r_sq",
         "chosen_len", "reject_len")


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], device) -> dict:
    """Right-padded prompt+response batch and the positions the loss reads, on `device`.

    mask [B, W-1] is aligned with labels = input_ids[:, 1:]: mask[b, t] == 1 when input_ids[b, t+1] is part of
    the response. rows (into the flattened [B*W] positions) and labels list those positions and their next
    tokens; index places them in the flattened [B*(W-1)] mask.
    """
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width - 1, dtype=torch.float32)
    rows, index = [], []
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        if not p:
            raise ValueError("a sample has an empty prompt: the first response token needs a token to be "
                             "predicted from (add a BOS token or a chat template)")
        input_ids[b, : len(s)] = torch.tensor(s)
        mask[b, len(p) - 1 : len(s) - 1] = 1.0
        positions = torch.arange(len(p) - 1, len(s) - 1)
        rows.append(b * width + positions)
        index.append(b * (width - 1) + positions)
    rows_t, index_t = torch.cat(rows), torch.cat(index)
    labels = input_ids.view(-1)[rows_t + 1]
    host = {"input_ids": input_ids, "mask": mask, "rows": rows_t, "labels": labels, "index": index_t}
    return {k: _to_device(v, torch.device(device)) for k, v in host.items()}


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without waiting for the device's queue (pinned memory, asynchronous copy)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def batch_rows(chunk: Sequence[TrainSample], preference: bool) -> tuple[list, list]:
    """(prompts, responses) of a micro-batch: the chosen responses, then (for pairs) the rejected ones."""
    responses = [s.chosen_ids for s in chunk] + ([s.rejected_ids for s in chunk] if preference else [])
    prompts = [s.prompt_ids for s in chunk] * (2 if preference else 1)
    return prompts, responses


def micro_batch_loss(token_logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor,
                     chunk: Sequence[TrainSample], cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss [n], float64 sums in STATS order, on token_logp's device) for rows laid out by
    `batch_rows`. token_logp / ref_logp: masked per-token log-probs of the policy and (for pairs) the reference.

    The sums are built from device tensors only: a Python number written into a CUDA tensor is a blocking copy.
    """
    n = len(chunk)
    device = token_logp.device
    total_of = lambda t: t.detach().sum().to(torch.float64)  # noqa: E731
    stats = {"pairs": torch.full((), n, dtype=torch.float64, device=device), "chosen_len": total_of(mask[:n])}
    sft = losses.sft_loss(losses.reduce_sequence(token_logp[:n], mask[:n], cfg.sft_average_log_probs))
    stats["sft_loss"] = total_of(sft)
    if ref_logp is None:
        total = sft
    else:
        ratio = losses.reduce_sequence(token_logp - ref_logp, mask, cfg.preference_average_log_probs)
        l_chosen, l_rejected = ratio[:n], ratio[n:]
        gap = None
        if all(s.chosen_score is not None and s.rejected_score is not None for s in chunk):
            gap = torch.tensor([s.chosen_score - s.rejected_score for s in chunk])
            gap = gap.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else gap
        pref = losses.preference_loss(cfg.preference_loss, l_chosen - l_rejected, cfg.beta, gap, cfg.gt_reward_scale)
        total = cfg.preference_loss_weight * pref + cfg.sft_loss_weight * sft
        r_c, r_r = (cfg.beta * l_chosen).detach(), (cfg.beta * l_rejected).detach()
        stats.update(preference_loss=total_of(pref), acc=total_of(l_chosen > l_rejected), r_chosen=total_of(r_c),
                     r_rejected=total_of(r_r), r_sq=total_of(r_c.square().sum() + r_r.square().sum()),
                     reject_len=total_of(mask[n:]))
    stats["loss"] = total_of(total)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return total, torch.stack([stats.get(k, zero) for k in STATS])


def step_metrics(sums: torch.Tensor | Sequence[float], lr: float, grad_norm: float,
                 preference: bool) -> dict[str, float]:
    """The step's metrics from the sums (STATS order) of every rank's micro-batches."""
    s = dict(zip(STATS, sums.tolist() if isinstance(sums, torch.Tensor) else sums))
    n = s["pairs"]
    out = {"loss": s["loss"] / n, "sft_loss": s["sft_loss"] / n, "grad_norm": grad_norm, "lr": lr,
           "chosen_lengths": s["chosen_len"] / n, "global_batch_pairs": n}
    if preference:
        mean_all = (s["r_chosen"] + s["r_rejected"]) / (2 * n)
        out.update({
            "preference_loss": s["preference_loss"] / n,
            "acc": s["acc"] / n,
            "rewards_chosen_mean": s["r_chosen"] / n,
            "rewards_rejected_mean": s["r_rejected"] / n,
            "rewards_all_mean": mean_all,
            "rewards_all_std": max(0.0, s["r_sq"] / (2 * n) - mean_all**2) ** 0.5,
            "reject_lengths": s["reject_len"] / n,
        })
    return out


def check_batch(samples: Sequence[TrainSample]) -> bool:
    """True for a batch of preference pairs, False for SFT samples; a mix or an empty batch is an error."""
    if not samples:
        raise ValueError("train_step got no samples")
    preference = samples[0].rejected_ids is not None
    if any((s.rejected_ids is not None) != preference for s in samples):
        raise ValueError("a batch must be all preference pairs or all SFT samples")
    return preference
