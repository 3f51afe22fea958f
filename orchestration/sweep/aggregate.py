"""Mean and spread over seeds of finished runs' iteration rows (pure: no files, no processes).

A run's `run_complete.json` holds {"iterations": [row, ...], "seconds": s}: rows 0..T-1 describe M_t (M1 is
row 0) and the data it made; a last row without steps is the final model. Rows line up across seeds by
position, with "final" for that last row, so runs of different lengths still share their final model.
"""

from __future__ import annotations

from statistics import fmean, stdev
from typing import Any, Mapping, Sequence

# The row figures aggregated when present (keys other engineers add later are picked up here by name).
METRICS = ("task_accuracy", "heldout_judge_accuracy", "judge_accuracy", "judge_parse_rate", "top_score_share",
           "chosen_length", "rejected_length", "reward_agreement", "judge_pair_batch_share", "judge_pairs",
           "judge_pair_accuracy",
           "pairs_trained", "bad_sample_rate")
GAIN_KEYS = ("task_accuracy", "heldout_judge_accuracy")
GAIN_THRESHOLD = 0.05  # a seed "gains" when its final model beats M1 by at least this much (5 points)
FINAL = "final"
Finished = Mapping[tuple[str, int], Mapping[str, Any]]  # (algorithm, seed) -> run_complete.json's content


def stats(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (n-1; 0 for one value) and n."""
    return {"mean": fmean(values), "std": stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def labelled_rows(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(label, row): "0", "1", ... by position, and "final" for a last row that trained nothing."""
    final = bool(rows) and not rows[-1].get("steps")
    return [(FINAL if final and i == len(rows) - 1 else str(i), row) for i, row in enumerate(rows)]


def label_order(labels) -> list[str]:
    return sorted((x for x in set(labels) if x != FINAL), key=int) + ([FINAL] if FINAL in labels else [])


def aggregate(finished: Finished, algorithms: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """Per algorithm: per row label and metric {mean, std, n, values: {seed: value}}, gains per seed and
    their summary, run seconds; and meta_rewarding minus self_rewarding on the seeds both finished."""
    result: dict[str, Any] = {"algorithms": {}, "meta_vs_self": None}
    for algorithm in algorithms:
        runs = {s: finished[(algorithm, s)] for s in seeds if (algorithm, s) in finished}
        result["algorithms"][algorithm] = {
            "seeds": list(runs),
            "rows": _rows(runs),
            "gains": _gains(runs),
            "seconds": {s: run.get("seconds") for s, run in runs.items()},
        }
    if "meta_rewarding" in algorithms and "self_rewarding" in algorithms:
        result["meta_vs_self"] = _difference(finished, seeds, "meta_rewarding", "self_rewarding")
    return result


def _rows(runs: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    by_label: dict[str, dict[int, Mapping[str, Any]]] = {}
    for seed, run in runs.items():
        for label, row in labelled_rows(run.get("iterations", [])):
            by_label.setdefault(label, {})[seed] = row
    out = []
    for label in label_order(by_label):
        seed_rows = by_label[label]
        metrics = {}
        for key in METRICS:
            values = {s: float(r[key]) for s, r in seed_rows.items() if r.get(key) is not None}
            if values:
                metrics[key] = {**stats(list(values.values())), "values": values}
        out.append({"label": label, "n": len(seed_rows), "metrics": metrics})
    return out


def final_row(run: Mapping[str, Any]) -> Mapping[str, Any] | None:
    labelled = labelled_rows(run.get("iterations", []))
    return labelled[-1][1] if labelled and labelled[-1][0] == FINAL else None


def _gain(run: Mapping[str, Any], key: str) -> float | None:
    rows, last = run.get("iterations", []), final_row(run)
    if last is None or rows[0].get(key) is None or last.get(key) is None:
        return None
    return float(last[key]) - float(rows[0][key])


def _gains(runs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    per_seed = {s: {key: _gain(run, key) for key in GAIN_KEYS} for s, run in runs.items()}
    summary = {}
    for key in GAIN_KEYS:
        values = [g[key] for g in per_seed.values() if g[key] is not None]
        if values:
            # The small tolerance keeps 0.60 - 0.55 (0.04999...) counted as a 5-point gain.
            summary[key] = {**stats(values), "min": min(values), "max": max(values),
                            "threshold": GAIN_THRESHOLD,
                            "n_at_least_threshold": sum(v >= GAIN_THRESHOLD - 1e-9 for v in values)}
    return {"per_seed": per_seed, "summary": summary}


def _difference(finished: Finished, seeds: Sequence[int], a: str, b: str) -> dict[str, Any]:
    """Final-model figures of `a` minus `b`, seed by seed, on the seeds where both have them."""
    out: dict[str, Any] = {"minuend": a, "subtrahend": b}
    for key in GAIN_KEYS:
        per_seed = {}
        for s in seeds:
            fa = final_row(finished[(a, s)]) if (a, s) in finished else None
            fb = final_row(finished[(b, s)]) if (b, s) in finished else None
            if fa and fb and fa.get(key) is not None and fb.get(key) is not None:
                per_seed[s] = float(fa[key]) - float(fb[key])
        out[key] = {**(stats(list(per_seed.values())) if per_seed else {"n": 0}), "per_seed": per_seed}
    return out
