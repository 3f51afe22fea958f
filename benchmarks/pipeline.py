"""Benchmark 3: the Self-Rewarding pipeline on 2 GPUs (or on one) against the throughput of its pools alone.

Split (2 GPUs): the generator and the judge replica share GPU 0 (half a GPU each in Ray's accounting: both decode on
the same small policy, and neither fills an H200 alone), the learner has GPU 1 (DESIGN.md: generation and
judging are the long pole; training must hide behind them). The model is the toy world's policy (trained
here, carried as a cache: random weights would produce no parseable judgements, so no pairs).

Two runs of one Self-Rewarding iteration with the same seeds and prompts:
  1. pools alone: each learner step is replaced by one that finishes at once, so pairs flow as fast as the
     generator and judge pools produce and judge them;
  2. the pipeline: real DPO steps on GPU 1 while later prompts are generated and judged.
--one-gpu: the README's one-GPU layout instead: generator 0.3, judge 0.3 and learner 0.4 of GPU 0, refits by
`auto` (cuda_ipc there), so the learner's steps compete with generation and judging for the same GPU.
Throughput: pairs trained (and tokens generated and judged) over the time between step completions, after
the first steps (the pipeline filling up). Target: run 2 >= 90% of run 1.

    SELFREWARD_CACHE=/path/to/toy/cache python benchmarks/pipeline.py [--batches 12] [hydra overrides ...]
    SELFREWARD_CACHE=/path/to/toy/cache python benchmarks/pipeline.py --one-gpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from learner.group import LearnerGroup  # noqa: E402
from orchestration import load_config, run, validate  # noqa: E402
from orchestration.config import refit_transport  # noqa: E402

WARMUP_STEPS = 2  # steps while the pipeline fills: left out of the medians


def _instant_step(self, samples, loss_cfg):
    """A learner step that finishes at once (run 1: the pools alone)."""
    return [ray.put({"loss": 0.0, "global_batch_pairs": float(len(samples))})]


def _one_run(overrides: list[str], output_dir: Path, pools_alone: bool) -> dict:
    cfg = load_config(["algorithm=self_rewarding", "algorithm.max_iterations=1", f"output_dir={output_dir}",
                       "logger.wandb.mode=disabled", *overrides])
    validate(cfg)
    started = time.perf_counter()
    if pools_alone:
        with mock.patch.object(LearnerGroup, "train_step_async", _instant_step):
            result = run(cfg)
    else:
        result = run(cfg)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in open(result.metrics_file)]
    steps = [r for r in rows if "train/pairs_per_s" in r][WARMUP_STEPS:]
    if not steps:
        return {}  # the warm-up run: too short to measure
    # Each step's window (time since the previous step) = its pairs / its rate: rates over the summed windows.
    windows = [r["train/global_batch_pairs"] / r["train/pairs_per_s"] for r in steps]
    total = sum(windows)
    rate = lambda key: sum(r[key] * w for r, w in zip(steps, windows)) / total  # noqa: E731
    return {"steps": len(steps) + WARMUP_STEPS, "pairs_per_s": rate("train/pairs_per_s"),
            "gen_tokens_per_s": rate("train/generator_tokens_per_s"),
            "judge_tokens_per_s": rate("train/judge_tokens_per_s"),
            "step_time": statistics.median(r["train/step_time"] for r in steps), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=12, help="global batches of prompts in the iteration")
    ap.add_argument("--cpu", action="store_true", help="the same two runs on CPU (checks the script)")
    ap.add_argument("--one-gpu", action="store_true", help="generator, judge and learner sharing GPU 0")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides (e.g. cluster sizes)")
    args = ap.parse_args()
    overrides = [f"algorithm.limit_train_batches={args.batches}", f"algorithm.save_interval={10 * args.batches}"]
    if args.one_gpu:
        if torch.cuda.device_count() < 1:
            raise SystemExit("--one-gpu needs a GPU")
        overrides += ["cluster.generators.num_gpus=0.3", "cluster.judges.num_gpus=0.3", "cluster.learner.num_gpus=0.4"]
    elif not args.cpu:
        if torch.cuda.device_count() < 2:
            raise SystemExit("this benchmark needs 2 GPUs (--one-gpu: the one-GPU layout; --cpu runs it on CPU)")
        overrides += ["cluster.generators.num_gpus=0.5", "cluster.judges.num_gpus=0.5", "cluster.learner.num_gpus=1"]
    if not args.cpu:
        overrides += ["cluster.learner.workers=1", "cluster.generators.max_batch_size=256",
                      "cluster.judges.max_batch_size=256"]
    overrides += args.overrides
    names = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if not args.cpu
             else [f"CPU ({torch.get_num_threads()} threads)"])
    print(f"hardware: {', '.join(names)}; torch {torch.__version__}, ray {ray.__version__}")
    print(f"overrides: {' '.join(overrides)}")
    print(f"refit transport (cluster.refit_transport=auto unless overridden): "
          f"{refit_transport(load_config(['algorithm=self_rewarding', *overrides]))}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # A short first run compiles the engines' Triton kernels (cached on disk for the runs that follow).
        warmup = [o for o in overrides if not o.startswith("algorithm.limit_train_batches=")]
        _one_run([*warmup, "algorithm.limit_train_batches=4"], Path(tmp) / "warmup", True)
        learner_at = "GPU 0, shared" if args.one_gpu else "GPU 1" if not args.cpu else "CPU"
        for name, alone in (("pools alone (instant learner)", True), (f"pipeline (DPO on {learner_at})", False)):
            results[name] = _one_run(overrides, Path(tmp) / ("alone" if alone else "pipeline"), alone)
    base = results["pools alone (instant learner)"]["pairs_per_s"]
    print(f"\n| {'run':<32} | {'steps':>5} | {'pairs/s':>8} | {'gen tok/s':>9} | {'judge tok/s':>11} | "
          f"{'step s':>6} | {'of alone':>8} |")
    print(f"|{'-' * 34}|{'-' * 7}|{'-' * 10}|{'-' * 11}|{'-' * 13}|{'-' * 8}|{'-' * 10}|")
    for name, r in results.items():
        print(f"| {name:<32} | {r['steps']:5d} | {r['pairs_per_s']:8.1f} | {r['gen_tokens_per_s']:9,.0f} | "
              f"{r['judge_tokens_per_s']:11,.0f} | {r['step_time']:6.2f} | {r['pairs_per_s'] / base:8.0%} |")
    print(f"(rates over steps {WARMUP_STEPS + 1}.. of each run; step s: the median learner step's own time)")


if __name__ == "__main__":
    main()
