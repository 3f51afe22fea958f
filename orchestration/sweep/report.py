"""The sweep's outputs: markdown tables (mean ± std over seeds) and a figure of accuracy per iteration."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .aggregate import GAIN_KEYS, label_order, labelled_rows, stats

# (key, column title, percent?) for the per-iteration tables; a column shows when any row has the figure.
COLUMNS = (
    ("task_accuracy", "task acc", True),
    ("heldout_judge_accuracy", "judge acc", True),
    ("judge_accuracy", "run judge acc", True),
    ("judge_parse_rate", "judge parse", True),
    ("top_score_share", "top score", True),
    ("reward_agreement", "agree", True),
    ("bad_sample_rate", "bad samples", True),
    ("chosen_length", "chosen len", False),
    ("rejected_length", "rejected len", False),
    ("pairs_trained", "pairs", False),
    ("judge_pairs", "judge pairs", False),
    ("judge_pair_batch_share", "jp batches", True),
    ("judge_pair_accuracy", "jp right", True),
)
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")  # one per algorithm
GAIN_TITLES = {"task_accuracy": "task acc gain", "heldout_judge_accuracy": "judge acc gain"}


def _pm(cell: Mapping[str, Any] | None, percent: bool) -> str:
    if not cell:
        return "-"
    if percent:
        return f"{cell['mean']:.1%} ± {cell['std']:.1%}"
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f} pts"


def _points_pm(cell: Mapping[str, Any]) -> str:
    return f"{cell['mean'] * 100:+.1f} ± {cell['std'] * 100:.1f} pts"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in body)]


def markdown(document: Mapping[str, Any]) -> str:
    """sweep.md: per algorithm a row per iteration ("final" = the final model), the gains per seed, and
    meta_rewarding minus self_rewarding when both ran."""
    settings, runs = document["settings"], document["runs"]
    done = sum(r["status"] == "complete" for r in runs)
    lines = [f"# Sweep: {len(settings['seeds'])} seed(s) x {len(settings['algorithms'])} algorithm(s)", "",
             f"Created by: `{document['command']}`", "",
             f"Runs finished: {done} of {len(runs)}. Cells are mean ± sample std over the finished seeds; n is "
             "the number of seeds in a row. Row t describes M_t (row 0 is M1) and the data it made; final is "
             "the final model.", ""]
    missing = [r for r in runs if r["status"] != "complete"]
    if missing:
        lines += ["Not aggregated (unfinished): " + ", ".join(
            f"{r['algorithm']} seed {r['seed']} ({r['status']}, log `{r['log']}`)" for r in missing), ""]
    for algorithm, agg in document["algorithms"].items():
        lines += [f"## {algorithm}", ""]
        if not agg["seeds"]:
            lines += ["No finished run.", ""]
            continue
        lines += [f"Seeds: {', '.join(map(str, agg['seeds']))}", ""]
        shown = [c for c in COLUMNS if any(c[0] in row["metrics"] for row in agg["rows"])]
        body = [[row["label"], str(row["n"]), *(_pm(row["metrics"].get(k), pct) for k, _, pct in shown)]
                for row in agg["rows"]]
        lines += _table(["iter", "n", *(title for _, title, _ in shown)], body) + [""]
        lines += _gains_table(agg, {r["seed"]: r for r in runs if r["algorithm"] == algorithm}) + [""]
    diff = document.get("meta_vs_self")
    if diff and any(diff[k]["n"] for k in GAIN_KEYS):
        lines += ["## meta_rewarding - self_rewarding (final model, same seeds)", ""]
        seeds = sorted({s for k in GAIN_KEYS for s in diff[k]["per_seed"]})
        body = [[str(s), *(_points(diff[k]["per_seed"].get(s)) for k in GAIN_KEYS)] for s in seeds]
        body.append(["mean ± std", *(_points_pm(diff[k]) if diff[k]["n"] else "-" for k in GAIN_KEYS)])
        lines += _table(["seed", "task acc diff", "judge acc diff"], body) + [""]
    return "\n".join(lines)


def _gains_table(agg: Mapping[str, Any], runs: Mapping[int, Mapping[str, Any]]) -> list[str]:
    per_seed, summary = agg["gains"]["per_seed"], agg["gains"]["summary"]
    body = [[str(s), *(_points(g[k]) for k in GAIN_KEYS), _seconds(runs.get(s))] for s, g in per_seed.items()]
    body.append(["mean ± std", *(_points_pm(summary[k]) if k in summary else "-" for k in GAIN_KEYS), ""])
    lines = ["Gains (final model - M1):", "", *_table(["seed", *(GAIN_TITLES[k] for k in GAIN_KEYS), "wall s"], body),
             ""]
    for key in GAIN_KEYS:
        if key in summary:
            s = summary[key]
            lines.append(f"- {GAIN_TITLES[key]}: {s['n_at_least_threshold']} of {s['n']} seeds gain at least "
                         f"{s['threshold'] * 100:.0f} pts; min {_points(s['min'])}, max {_points(s['max'])}")
    return lines


def _seconds(run: Mapping[str, Any] | None) -> str:
    """The sweep's wall time for the run (start-up included, all attempts), else the run's own figure."""
    value = run and (run.get("wall_seconds") or run.get("seconds"))
    return f"{value:.0f}" if value else "-"


def plot(finished: Mapping[tuple[str, int], Mapping[str, Any]], algorithms: Sequence[str], path: Path) -> None:
    """Task accuracy (left) and held-out judge accuracy (right; the run's judge accuracy where the held-out
    one is missing) per iteration: mean with std error bars per algorithm, each seed as a faint line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    labels = label_order({lab for run in finished.values() for lab, _ in labelled_rows(run.get("iterations", []))})
    x_of = {lab: i for i, lab in enumerate(labels)}
    panels = ((("task_accuracy",), "task accuracy"),
              (("heldout_judge_accuracy", "judge_accuracy"), "held-out judge accuracy"))
    for ax, (keys, title) in zip(fig.subplots(1, 2), panels):
        for color, algorithm in zip(COLORS, algorithms):
            runs = [run for (a, _), run in sorted(finished.items()) if a == algorithm]
            key = next((k for k in keys if any(r.get(k) is not None for run in runs
                                                for r in run.get("iterations", []))), None)
            if key is not None:
                fallback = "" if key == keys[0] else f", {key}"  # the run's own judge accuracy stands in
                _curves(ax, runs, key, x_of, color, f"{algorithm} (n={len(runs)}{fallback})")
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, 0.0), min(high, 1.0))  # accuracies: error bars may reach past 0% or 100%
        ax.set_title(title)
        ax.set_xticks(range(len(labels)), [_tick(lab) for lab in labels])
        ax.set_xlabel("iteration")
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes)
    seeds = {s for _, s in finished}
    fig.suptitle(f"{len(seeds)} seed(s): mean ± std over seeds, one faint line per seed")
    fig.savefig(path, dpi=110)


def _curves(ax, runs: Sequence[Mapping[str, Any]], key: str, x_of: Mapping[str, int], color: str, label: str) -> None:
    points: dict[str, list[float]] = {}
    for run in runs:
        xy = []
        for lab, row in labelled_rows(run.get("iterations", [])):
            if row.get(key) is not None:
                xy.append((x_of[lab], float(row[key])))
                points.setdefault(lab, []).append(float(row[key]))
        if xy:
            ax.plot(*zip(*xy), color=color, alpha=0.25, linewidth=1)
    if points:
        order = sorted(points, key=lambda lab: x_of[lab])
        cells = [stats(points[lab]) for lab in order]
        ax.errorbar([x_of[lab] for lab in order], [c["mean"] for c in cells], yerr=[c["std"] for c in cells],
                    color=color, marker="o", capsize=3, linewidth=2, label=label)


def _tick(label: str) -> str:
    return "0 (M1)" if label == "0" else label
