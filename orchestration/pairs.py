"""Pair selection for Self-Rewarding (SPEC section 3, steps 4-6): judge scores -> (chosen, rejected)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Candidate:
    """One generated response as pair selection sees it."""

    token_ids: tuple[int, ...]
    ended: bool  # stopped on an end-of-turn/EOS token or stop string
    mean: float | None  # mean of its valid judge scores; None if it has none
    variance: float | None


@dataclass(frozen=True)
class Selection:
    chosen: int | None  # index into the candidates, or None for a bad sample
    rejected: int | None
    reason: str = ""  # why the prompt is a bad sample

    @property
    def is_pair(self) -> bool:
        return self.chosen is not None


def select_pair(candidates: Sequence[Candidate], length_control: float = 0.0) -> Selection:
    """Choose (chosen, rejected) among properly ended, scored responses, or say why there is no pair."""
    usable = [i for i, c in enumerate(candidates) if c.ended and c.mean is not None]
    if len(usable) < 2:
        return Selection(None, None, "fewer than 2 scored, properly ended responses")
    means = {i: candidates[i].mean for i in usable}
    s_max, s_min = max(means.values()), min(means.values())
    if s_max == s_min:
        return Selection(None, None, "all responses scored equally")
    rho = length_control
    if rho > 0:
        chosen_floor = (1 - rho) * s_max + rho * s_min
        rejected_ceiling = (1 - rho) * s_min + rho * s_max
        in_chosen = [i for i in usable if means[i] >= chosen_floor]
        in_rejected = [i for i in usable if means[i] <= rejected_ceiling]
        # Shortest chosen, longest rejected; ties by index (min/max return the first).
        chosen = min(in_chosen, key=lambda i: len(candidates[i].token_ids))
        rejected = max(in_rejected, key=lambda i: (len(candidates[i].token_ids), -i))
    else:
        chosen = _lowest_variance([i for i in usable if means[i] == s_max], candidates)
        rejected = _lowest_variance([i for i in usable if means[i] == s_min], candidates)
    if candidates[chosen].token_ids == candidates[rejected].token_ids:
        return Selection(None, None, "chosen and rejected are identical")
    return Selection(chosen, rejected)


def _lowest_variance(indices: list[int], candidates: Sequence[Candidate]) -> int:
    return min(indices, key=lambda i: (candidates[i].variance or 0.0, i))
