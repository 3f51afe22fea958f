"""Metrics sinks: one JSON object per step in output_dir/metrics.jsonl, and wandb (offline by default).

A checkpoint records how long each of these files was; a resumed run cuts them back to that length, so
rows logged after the checkpoint (and logged again by the resumed run) appear once.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

WANDB_ID_FILE = "wandb_run_id"


class MetricsLogger:
    def __init__(self, output_dir: Path, wandb_mode: str, project: str, run_name: str | None, config: dict,
                 resume_sizes: dict[str, int] | None = None, log=print):
        self.output_dir = output_dir
        self.path = output_dir / "metrics.jsonl"
        if resume_sizes is not None:
            self._cut_back(resume_sizes)
        self._file = open(self.path, "a", encoding="utf-8")
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb

            id_file = output_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            # A resumed run continues the same wandb run; wandb keeps rows it already has for a step.
            # wandb's own banner would be most of a run's console: one line of ours says where the run is.
            self._wandb = wandb.init(project=project, name=run_name, mode=wandb_mode, config=config,
                                     dir=str(output_dir), reinit="finish_previous", id=run_id, resume="allow",
                                     settings=wandb.Settings(silent=True))
            run_dir = Path(self._wandb.dir).parent
            where = self._wandb.url if wandb_mode == "online" else f"{run_dir} (upload: wandb sync {run_dir})"
            log(f"[wandb] {wandb_mode} run {run_id}: {where}")

    def _files(self) -> list[Path]:
        return [self.path] + sorted(self.output_dir.glob("table_*.jsonl"))

    def _cut_back(self, sizes: dict[str, int]) -> None:
        for path in self._files():
            size = sizes.get(path.name, 0)
            if path.stat().st_size > size:
                with open(path, "r+b") as f:
                    f.truncate(size)

    def sizes(self) -> dict[str, int]:
        """Each file's length (after a flush): what a checkpoint records."""
        return {p.name: p.stat().st_size for p in self._files() if p.exists()}

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

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
