"""A sweep from start to end: the runs, then sweep.json, sweep.md and sweep_accuracy.png from what finished."""

from __future__ import annotations

import json
import shlex
from typing import Any, Callable, Sequence

from .aggregate import aggregate
from .args import SweepArgs
from .report import markdown, plot
from .runs import Executor, Launcher, Outcome, Run, check_same_args, load_finished, plan, wall_seconds

JSON_NAME, MD_NAME, PNG_NAME = "sweep.json", "sweep.md", "sweep_accuracy.png"


def sweep(args: SweepArgs, command: str, log: Callable[[str], None] = print, launcher: Launcher | None = None) -> int:
    """Run what is unfinished, write the outputs from every finished run; the exit code (see USAGE)."""
    runs = plan(args.algorithms, args.seeds, args.output_dir, args.overrides)
    check_same_args(runs)
    log(f"[sweep] {len(runs)} runs: seeds {', '.join(map(str, args.seeds))} x {', '.join(args.algorithms)}, "
        f"{args.parallel} at a time; outputs in {args.output_dir}")
    executor = Executor(runs, args.parallel, log=log, launcher=launcher)
    outcomes = executor.execute()
    doc = document(args, command, runs, outcomes)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / JSON_NAME).write_text(json.dumps(doc, indent=2))
    text = markdown(doc)
    (args.output_dir / MD_NAME).write_text(text + "\n")
    plot(load_finished(runs), args.algorithms, args.output_dir / PNG_NAME)
    log(text)
    log(f"[sweep] wrote {args.output_dir / JSON_NAME}, {args.output_dir / MD_NAME}, {args.output_dir / PNG_NAME}")
    unfinished = [r for r in doc["runs"] if r["status"] != "complete"]
    if executor.signal is not None:
        log(f"[sweep] interrupted with {len(unfinished)} run(s) unfinished: rerun the same command to continue")
        return 128 + executor.signal
    if unfinished:
        log(f"[sweep] {len(unfinished)} of {len(runs)} run(s) did not finish: "
            + "; ".join(f"{r['algorithm']} seed {r['seed']} ({r['status']}, log {r['log']})" for r in unfinished))
        return 1
    return 0


def document(args: SweepArgs, command: str, runs: Sequence[Run], outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """sweep.json: settings, each run's command and status, and the aggregate of the finished runs."""
    finished = load_finished(runs)
    last = {o.run: o for o in outcomes}
    rows = []
    for r in runs:
        outcome = last.get(r)
        status = "complete" if (r.algorithm, r.seed) in finished else (outcome.status if outcome else "not started")
        rows.append({"algorithm": r.algorithm, "seed": r.seed, "output_dir": str(r.directory), "log": str(r.log),
                     "command": list(r.command), "command_line": shlex.join(r.command), "status": status,
                     "exit_code": outcome.exit_code if outcome else None,
                     "seconds": finished.get((r.algorithm, r.seed), {}).get("seconds"),  # the run's own figure
                     "wall_seconds": wall_seconds(r)})  # the sweep's, summed over the run's attempts
    return {"command": command,
            "settings": {"seeds": list(args.seeds), "algorithms": list(args.algorithms),
                         "output_dir": str(args.output_dir), "parallel": args.parallel,
                         "overrides": list(args.overrides)},
            "runs": rows,
            "unfinished": [{k: r[k] for k in ("algorithm", "seed", "status", "log")} for r in rows
                           if r["status"] != "complete"],
            **aggregate(finished, args.algorithms, args.seeds)}
