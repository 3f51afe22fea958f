"""Streaming refits on the toy world (CPU): pairs/s and final toy task accuracy for algorithm.refit_every_steps
in {1, 4, boundary}, one Self-Rewarding run each with the same seed, printed as one table.

pairs/s = pairs trained over the iterations' wall time (generation, judging and training overlapped; the
evaluations between iterations left out). Accuracy: greedy task accuracy of the final model on the toy
world's held-out questions (final/task_accuracy). Lag: how many weight versions the trained pairs' generation
was behind the learner (mean and max), and the pairs dropped as older than algorithm.max_policy_lag.

    python benchmarks/streaming.py [--every 1 4 boundary] [hydra overrides ...]
e.g. with a smaller toy world:
    python benchmarks/streaming.py model.toy.train_prompts=96 model.toy.bootstrap_steps=250
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(every: str, overrides: list[str], output_dir: Path) -> dict:
    knob = "null" if every == "boundary" else every
    args = [sys.executable, "-m", "orchestration.main", "algorithm=self_rewarding", f"output_dir={output_dir}",
            "logger.wandb.mode=disabled", f"algorithm.refit_every_steps={knob}", *overrides]
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"refit_every_steps={every} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    iters = [r for r in rows if "iter/pairs_trained" in r]
    pairs = sum(r["iter/pairs_trained"] for r in iters)
    seconds = sum(r["iter/pairs_trained"] / r["iter/pairs_per_s"] for r in iters if r.get("iter/pairs_per_s"))
    final = [r["final/task_accuracy"] for r in rows if "final/task_accuracy" in r]
    first = [r["iter/task_accuracy"] for r in iters if "iter/task_accuracy" in r][:1]
    lags = [r for r in rows if "train/policy_lag_mean" in r]
    return {
        "refit_every_steps": every, "pairs": pairs, "pairs_per_s": pairs / seconds if seconds else float("nan"),
        "task_acc_start": first[0] if first else float("nan"), "task_acc_final": final[-1] if final else float("nan"),
        "lag_mean": (sum(r["train/policy_lag_mean"] for r in lags) / len(lags)) if lags else 0.0,
        "lag_max": max((r["train/policy_lag_max"] for r in lags), default=0),
        "stale_dropped": sum(r.get("iter/stale_pairs_dropped", 0) for r in rows),
        "refits": sum(1 for r in rows if "train/refit_time_s" in r),
        "refit_s": sum(r.get("train/refit_time_s", 0.0) for r in rows),
        "pool_wait_s": sum(r.get("train/pool_refit_wait_s", 0.0) for r in rows),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", nargs="+", default=["1", "4", "boundary"])
    args, overrides = parser.parse_known_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for every in args.every:
            results.append(one_run(every, overrides, Path(tmp) / f"every_{every}"))
            print(f"[bench] refit_every_steps={every}: {results[-1]}", file=sys.stderr, flush=True)
    header = ("refit_every_steps", "pairs", "pairs/s", "task acc start", "task acc final", "lag mean", "lag max",
              "stale dropped", "refits", "refit s", "pool wait s", "wall s")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in results:
        cells = (r["refit_every_steps"], r["pairs"], f"{r['pairs_per_s']:.2f}", f"{r['task_acc_start']:.3f}",
                 f"{r['task_acc_final']:.3f}", f"{r['lag_mean']:.2f}", r["lag_max"], r["stale_dropped"], r["refits"],
                 f"{r['refit_s']:.2f}", f"{r['pool_wait_s']:.2f}", f"{r['wall_s']:.0f}")
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
