"""Plain data that crosses the learner boundary (from the orchestrator, through Ray)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TrainSample:
    """One training example. With `rejected_ids` it is a preference pair; without, an SFT example."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None = None
    chosen_score: float | None = None  # mean judge scores (used by score-aware losses)
    rejected_score: float | None = None


@dataclass(frozen=True)
class LossConfig:
    """How one step turns samples into a loss (SPEC section 6). beta may change per iteration."""

    preference_loss: str = "dpo"
    beta: float = 0.1  # ref_policy_kl_penalty of the current iteration
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool = False
    gt_reward_scale: float = 1.0  # eta: scales the judge-score gap in the rpo_* losses


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "constant"
    decay_steps: int = 0  # cosine: steps from the end of warmup down to min_lr (0 = constant after warmup)
    max_grad_norm: float = 1.0  # 0 disables clipping
    micro_batch_size: int = 1
