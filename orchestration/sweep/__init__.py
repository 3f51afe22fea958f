"""Seed sweeps of the toy world: `python -m orchestration.sweep` (docs/sweep.md).

    args       the parsed arguments (SweepArgs)
    cli        argument parsing and checks, main()
    runs       one subprocess per (algorithm, seed), resumable, signals passed on
    aggregate  mean / std over seeds per iteration row, gains (pure functions)
    report     sweep.md tables and sweep_accuracy.png
    job        the whole sweep: runs, then outputs
"""

from .aggregate import aggregate, stats
from .args import SweepArgs
from .cli import main, parse_args

__all__ = ["SweepArgs", "aggregate", "main", "parse_args", "stats"]
