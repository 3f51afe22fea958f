"""Metrics sinks: one JSON object per step in output_dir/metrics.jsonl, and wandb (offline by default)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, output_dir: Path, wandb_mode: str, project: str, run_name: str | None, config: dict):
        self.output_dir = output_dir
        self.path = output_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=project, name=run_name, mode=wandb_mode, config=config,
                                     dir=str(output_dir), reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table both in wandb and as JSONL lines (one object per row) in output_dir/<name>.jsonl."""
        path = self.output_dir / (name.replace("/", "_") + ".jsonl")
        with open(path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(columns, row))) + "\n")
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
