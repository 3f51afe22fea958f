"""Checkpoints on disk: written atomically, found again on resume, pruned to `checkpoint.keep_last`.

A checkpoint is a directory under `<output_dir>/checkpoints/`: the learner's files (a Hugging Face model
directory, optimizer and scheduler state, every rank's RNG state) plus `run_state.json`, the orchestrator's
state (counters, data position, pairs not yet trained on, waiting judge pairs, where the reference weights
are, how long metrics.jsonl was). Everything is first written to `<name>.partial/`; `run_state.json` is the
last file in, and a rename publishes the directory. A crash at any moment leaves the previous checkpoints
as they were, and at worst a `.partial` directory that the next start removes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError
from .faults import crash_point

RUN_STATE = "run_state.json"
PARTIAL, OLD = ".partial", ".old"


@dataclass
class Checkpoint:
    path: Path
    state: dict

    @property
    def name(self) -> str:
        return self.path.name


class Checkpoints:
    def __init__(self, output_dir: Path, keep_last: int | None):
        self.root = output_dir / "checkpoints"
        self.keep_last = keep_last
        self._serial = max((c.state["serial"] for c in self.complete()), default=0)

    # ---- finding -------------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Tidy what a crash may have left; return what was removed (for the log)."""
        removed = []
        if not self.root.is_dir():
            return removed
        for d in sorted(self.root.iterdir()):
            if d.name.endswith(PARTIAL):
                final = d.with_name(d.name[: -len(PARTIAL)])
                if (d / RUN_STATE).exists() and not final.exists():  # crashed between the two renames
                    os.replace(d, final)
                    continue
                shutil.rmtree(d)
                removed.append(d.name)
        for d in sorted(self.root.iterdir()):
            if d.name.endswith(OLD) or d.name.endswith(".tmp"):
                shutil.rmtree(d)
                removed.append(d.name)
        return removed

    def complete(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            state_file = d / RUN_STATE
            if d.is_dir() and not d.name.endswith((PARTIAL, OLD, ".tmp")) and state_file.exists():
                found.append(Checkpoint(d, json.loads(state_file.read_text())))
        return sorted(found, key=lambda c: c.state["serial"])

    def latest(self) -> Checkpoint | None:
        done = self.complete()
        return done[-1] if done else None

    @staticmethod
    def named(path: str) -> Checkpoint:
        d = Path(path).expanduser().resolve()
        if not (d / RUN_STATE).exists():
            raise ConfigError(f"resume={path!r} is not a complete checkpoint (no {RUN_STATE} in it)")
        return Checkpoint(d, json.loads((d / RUN_STATE).read_text()))

    # ---- writing -------------------------------------------------------------------------------------

    def save(self, name: str, write_learner, state: dict) -> Path:
        """write_learner(dir) writes the learner's files; `state` becomes run_state.json."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / name
        partial = self.root / (name + PARTIAL)
        shutil.rmtree(partial, ignore_errors=True)
        write_learner(str(partial))
        crash_point("checkpoint")
        self._serial += 1
        state = {**state, "serial": self._serial, "name": name}
        _write_synced(partial / RUN_STATE, json.dumps(state))
        if final.exists():  # the same name again (a clean stop at an interval step): keep one
            old = self.root / (name + OLD)
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old)
        else:
            os.replace(partial, final)
        _sync_dir(self.root)
        self.prune()
        return final

    def prune(self) -> list[str]:
        """Keep the newest `keep_last` step checkpoints. Iteration-end checkpoints are the models of each
        iteration, and the only ones a step checkpoint points to as its reference: they are always kept."""
        if not self.keep_last:
            return []
        steps = [c for c in self.complete() if c.state.get("phase") == "mid"]
        for c in steps[: -self.keep_last]:
            shutil.rmtree(c.path)
        return [c.name for c in steps[: -self.keep_last]]


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
