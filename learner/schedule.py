"""Learning-rate schedule: linear warmup, then cosine decay to min_lr or constant."""

from __future__ import annotations

import math

from .types import OptimConfig


def lr_at(step: int, cfg: OptimConfig) -> float:
    """LR for optimizer step `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or cfg.decay_steps <= 0:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / cfg.decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
