"""The end-of-run table: one row per iteration."""

from __future__ import annotations

COLUMNS = (
    ("iteration", "iter", "{}"),
    ("task_accuracy", "task acc", "{:.1%}"),
    ("heldout_judge_accuracy", "judge acc", "{:.1%}"),
    ("judge_parse_rate", "judge parse", "{:.1%}"),
    ("judge_accuracy", "run judge acc", "{:.1%}"),
    ("top_score_share", "top score", "{:.1%}"),
    ("chosen_score", "chosen score", "{:.2f}"),
    ("rejected_score", "rejected score", "{:.2f}"),
    ("chosen_length", "chosen len", "{:.1f}"),
    ("rejected_length", "rejected len", "{:.1f}"),
    ("bad_sample_rate", "bad samples", "{:.1%}"),
    ("reward_agreement", "agree", "{:.1%}"),
    ("pairs_trained", "pairs", "{}"),
    ("judge_pairs", "judge pairs", "{}"),
    ("judge_pair_batch_share", "jp batches", "{:.1%}"),
    ("judge_pair_accuracy", "jp right", "{:.1%}"),
    ("verified_share", "verified", "{:.1%}"),
    ("verifier_score", "verifier score", "{:.2f}"),
    ("steps", "steps", "{}"),
    ("pairs_per_s", "pairs/s", "{:.2f}"),
    ("val_loss", "val loss", "{:.4f}"),
)


def format_table(rows: list[dict]) -> str:
    """Iteration t's row describes M_t (task accuracy) and the data it made; the last row without pairs is
    the final model. Columns no row has a value for (judge columns under SPIN) are left out."""
    columns = [c for c in COLUMNS if c[0] == "iteration" or any(row.get(c[0]) is not None for row in rows)]
    header = [title for _, title, _ in columns]
    body = [[_cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    if rows and not rows[-1].get("steps") and rows[-1].get("task_accuracy") is not None:
        body[-1][0] = "final"
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
