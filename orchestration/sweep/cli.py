"""`python -m orchestration.sweep`: the toy world's runs for several seeds and algorithms, with mean and
spread over seeds. Own keys below; every other key=value is passed unchanged to every run."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from ..config import ALGORITHMS, load_config
from ..errors import ConfigError
from .args import SweepArgs

SWEEPABLE = tuple(a for a in ALGORITHMS if a != "generate")  # the ones whose runs end with iteration rows
OWN_KEYS = ("seeds", "algorithms", "output_dir", "parallel")
# Set per run by the sweep itself: a pass-through value would silently make every run the same.
RESERVED = {"seed": "seeds=N or seeds=[...]", "algorithm": "algorithms=[...]", "algorithm.name": "algorithms=[...]"}

USAGE = """usage: python -m orchestration.sweep [seeds=N|[s1,s2,...]] [algorithms=[a,...]|a] [output_dir=DIR]
                                  [parallel=K] [key=value ...]

Runs `python -m orchestration.main algorithm=A seed=S output_dir=DIR/A/seed_S key=value...` for each seed
and algorithm (each seed's algorithms in a row, so its toy world is built once), then writes DIR/sweep.json,
DIR/sweep.md (mean ± std over seeds per iteration, gains per seed) and DIR/sweep_accuracy.png.

  seeds=N          seeds 1..N (default 3), or a list: seeds=[3,7,9]
  algorithms=...   self_rewarding, meta_rewarding, spin; a list or one name (default
                   [self_rewarding,meta_rewarding])
  output_dir=DIR   default outputs/sweep; a run's output and log (sweep.log) are in DIR/<algorithm>/seed_<S>
  parallel=K       runs at once on this machine, each with its own local Ray cluster (default 1)
  key=value        any other override, checked before any run starts and passed to every run

Rerun the same command to continue: finished runs are skipped, interrupted ones resume from their checkpoint.
Exit codes: 0 all runs finished; 1 some run failed or did not finish; 2 bad arguments; 130/143 interrupted.
Docs: docs/sweep.md."""


def parse_args(argv: Sequence[str]) -> SweepArgs:
    """The sweep's own keys and the runs' overrides; raises ConfigError naming the bad argument."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    own: dict[str, Any] = {}
    overrides = []
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            raise ConfigError(f"argument {arg!r} is not key=value (see --help)")
        try:
            parsed = parser.parse_override(arg)
        except HydraException as e:
            raise ConfigError(f"argument {arg!r} does not parse: {str(e).strip().splitlines()[0]}") from None
        key = parsed.key_or_group
        if key in OWN_KEYS:
            if parsed.get_key_element() != key:
                raise ConfigError(f"{arg!r}: write the sweep's own key as {key}=value")
            if key in own:
                raise ConfigError(f"{key} is given twice")
            own[key] = parsed.value()
        elif key in RESERVED:
            raise ConfigError(f"{arg!r}: the sweep sets {key} for each run; use {RESERVED[key]}")
        else:
            overrides.append(arg)
    defaults = SweepArgs()
    return SweepArgs(seeds=_seeds(own["seeds"]) if "seeds" in own else defaults.seeds,
                     algorithms=_algorithms(own["algorithms"]) if "algorithms" in own else defaults.algorithms,
                     output_dir=Path(str(own.get("output_dir", defaults.output_dir))),
                     parallel=_positive("parallel", own.get("parallel", defaults.parallel)),
                     overrides=tuple(overrides))


def _positive(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a whole number >= 1")
    return value


def _seeds(value: Any) -> tuple[int, ...]:
    if isinstance(value, list):
        if not value:
            raise ConfigError("seeds=[] names no seed")
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ConfigError(f"seeds={value!r}: every seed must be a whole number >= 1, got {bad[0]!r}")
        seeds = tuple(value)
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds={list(seeds)} repeats a seed")
        return seeds
    return tuple(range(1, _positive("seeds", value) + 1))


def _algorithms(value: Any) -> tuple[str, ...]:
    names = tuple(value) if isinstance(value, list) else (value,)
    if not names:
        raise ConfigError("algorithms=[] names no algorithm")
    for name in names:
        if name not in SWEEPABLE:
            raise ConfigError(f"algorithms: {name!r} is not one of {', '.join(SWEEPABLE)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"algorithms={list(names)} repeats an algorithm")
    return names


def check_runs(args: SweepArgs) -> None:
    """Compose each algorithm's configuration with the overrides, so a bad key fails before any run starts."""
    for algorithm in args.algorithms:
        try:
            load_config([f"algorithm={algorithm}", f"seed={args.seeds[0]}",
                         f"output_dir={args.output_dir / algorithm}", *args.overrides])
        except ConfigError as e:
            raise ConfigError(f"algorithm={algorithm} with the run overrides: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        args = parse_args(argv)
        check_runs(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    from .job import sweep  # imports the driver (and Ray) only once the arguments are good
    from .runs import SweepConflict

    try:
        return sweep(args, "python -m orchestration.sweep" + (" " + shlex.join(argv) if argv else ""))
    except SweepConflict as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
