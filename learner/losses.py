"""Preference and SFT losses (SPEC section 6): dpo, ipo, rpo_sq, rpo_bwd_kl, rpo_fwd_kl, scale.

All functions take per-sequence quantities (one value per pair) and return per-pair losses; the caller
averages over the pairs of the global batch, so every pair weighs the same whatever the micro-batching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREFERENCE_LOSSES = ("dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "scale")


# Rows of logits turned to float32 at a time (a 256 MiB temporary at a 128k vocabulary): the float32
# [tokens, vocab] tensor is never materialised whole.
_LOGPROB_CHUNK_ELEMENTS = 1 << 26


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits)[label] = logits[label] - logsumexp(logits), row chunk by row chunk, in float32.

    Saves only the (low-precision) logits and one logsumexp per row; the backward recomputes the softmax of each
    chunk from them and writes d logits = g * (onehot(label) - softmax) straight into the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)
        n, vocab = logits.shape
        rows = max(1, _LOGPROB_CHUNK_ELEMENTS // vocab)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        for i in range(0, n, rows):
            chunk = logits[i : i + rows]
            peak = chunk.amax(-1, keepdim=True).to(acc)  # exact: the max of the stored values
            total = torch.sub(chunk, peak).exp_().sum(-1)  # chunk - peak promotes to float32
            lse[i : i + rows] = peak.squeeze(-1) + total.log()
        label_logits = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).to(acc)
        ctx.save_for_backward(logits, labels, lse)
        return label_logits - lse

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        n, vocab = logits.shape
        rows = max(1, _LOGPROB_CHUNK_ELEMENTS // vocab)
        grad = torch.empty_like(logits)
        for i in range(0, n, rows):
            chunk, g = logits[i : i + rows], grad_out[i : i + rows]
            probs = torch.sub(chunk, lse[i : i + rows].unsqueeze(-1)).exp_()
            # softmax - onehot in float32 before rounding: 1 - p of a confident label cancels badly in bf16.
            probs.scatter_add_(-1, labels[i : i + rows].unsqueeze(-1), probs.new_full((len(chunk), 1), -1.0))
            torch.mul(probs, -g.unsqueeze(-1), out=grad[i : i + rows])
        return grad, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) of each row: logits [N, V] (any float dtype) and labels [N] -> [N] in float32 (float64 for
    float64 logits).

    The log-softmax reduction runs in float32 (bf16 log-probs are too coarse for the DPO margin) without a
    float32 copy of the whole [N, V] logits, forward or backward.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"token_logprobs wants logits [N, V] and labels [N], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    return _TokenLogprobs.apply(logits, labels)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of `labels` under `logits`, zeroed where `mask` is 0.

    logits [B, T, V] predict labels [B, T] (already shifted by the caller); mask [B, T] marks response tokens.
    """
    batch, steps, vocab = logits.shape
    token_logp = token_logprobs(logits.reshape(batch * steps, vocab), labels.reshape(-1))
    return token_logp.view(batch, steps) * mask


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
