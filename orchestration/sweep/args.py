"""What a sweep runs: the parsed arguments (cli.py builds them, job.py carries them out)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_ALGORITHMS = ("self_rewarding", "meta_rewarding")


@dataclass(frozen=True)
class SweepArgs:
    seeds: tuple[int, ...] = (1, 2, 3)
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    output_dir: Path = Path("outputs/sweep")
    parallel: int = 1
    overrides: tuple[str, ...] = ()
