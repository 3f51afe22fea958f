"""Preference and SFT losses (SPEC section 6): dpo, ipo, rpo_sq, rpo_bwd_kl, rpo_fwd_kl, scale.

All functions take per-sequence quantities (one value per pair) and return per-pair losses; the caller
averages over the pairs of the global batch, so every pair weighs the same whatever the micro-batching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREFERENCE_LOSSES = ("dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "scale")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of `labels` under `logits`, zeroed where `mask` is 0.

    logits [B, T, V] predict labels [B, T] (already shifted by the caller); mask [B, T] marks response tokens.
    log_softmax in float32: bf16 log-probs are too coarse for the DPO margin.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)
    return token_logp * mask


def reduce_sequence(token_values: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """Sum (or mean) over each sequence's masked tokens -> [B]."""
    total = token_values.sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1)


def dpo_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * Delta), Delta = l_chosen - l_rejected (policy minus reference log-ratios)."""
    return -F.logsigmoid(beta * delta)


def _bernoulli_kl(logit_p: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(sigmoid(logit_p)) || Bernoulli(sigmoid(logit_q))), from log-sigmoids (no log(0))."""
    p = torch.sigmoid(logit_p)
    return (p * (F.logsigmoid(logit_p) - F.logsigmoid(logit_q))
            + (1 - p) * (F.logsigmoid(-logit_p) - F.logsigmoid(-logit_q)))


def preference_loss(name: str, delta: torch.Tensor, beta: float, score_gap: torch.Tensor | None = None,
                    gt_reward_scale: float = 1.0) -> torch.Tensor:
    """Per-pair loss of SPEC section 6. score_gap = g_chosen - g_rejected (mean judge scores)."""
    if name == "dpo":
        return dpo_loss(delta, beta)
    if name == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference_loss {name!r}; expected one of {', '.join(PREFERENCE_LOSSES)}")
    if score_gap is None:
        raise ValueError(f"preference_loss={name!r} needs the judge scores of chosen and rejected")
    target = gt_reward_scale * score_gap
    if name == "rpo_sq":
        return (beta * delta - target) ** 2
    if name == "rpo_bwd_kl":
        return _bernoulli_kl(target, beta * delta)
    if name == "rpo_fwd_kl":
        return _bernoulli_kl(beta * delta, target)
    return score_gap.abs() * dpo_loss(delta, beta)  # scale


def sft_loss(chosen_logps: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the chosen response (already summed or averaged per sequence)."""
    return -chosen_logps
