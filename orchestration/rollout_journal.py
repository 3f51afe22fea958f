"""The rollout journal (`checkpoint.record_rollouts`, docs/resume.md): what the generator and judge pools
returned, written to disk before the run uses it, so that a resumed run replays it instead of asking the
pools again.

Exact resume (SPEC section 9) regenerates the prompts that were in flight at the checkpoint and relies on the
engines giving the same tokens for the same seed whatever else is in the batch. The torch engine does; an
engine that does not promise it (TensorRT-LLM: `BATCH_INVARIANT = False`) would give a resumed run other,
equally valid samples. With the journal on, every pool call's result is stored under its chunk (iteration,
the chunk's (epoch, prompt index) pairs, its weight version) and stage; a resumed run that issues the same
call takes the stored result. The schedule is decided from the data alone, so the same calls come again.

Layout: `<output_dir>/rollout_journal/fingerprint.json` (what decides the rollouts: a journal recorded under
another configuration is discarded, never replayed) and `iter_<t>/<chunk digest>-<stage>.pkl`, each written
to a temporary name and renamed, so a kill leaves whole entries or none. An iteration's entries are removed
once its iteration-end checkpoint is written (a resume never goes back into it).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Iterable

JOURNAL_DIR = "rollout_journal"
FINGERPRINT = "fingerprint.json"


def chunk_key(iteration: int, records: Iterable, version: int | None) -> tuple:
    """What identifies a chunk's calls: its iteration, its prompts (epoch, index) in order, its weight version."""
    return (iteration, tuple((r.epoch, r.index) for r in records), version)


class RolloutJournal:
    def __init__(self, output_dir: str | os.PathLike, fingerprint: str, log=print):
        self.root = Path(output_dir) / JOURNAL_DIR
        self.fingerprint = fingerprint
        self.replayed = 0  # calls answered from the journal since the run started
        self.recorded = 0
        marker = self.root / FINGERPRINT
        if self.root.exists():
            held = json.loads(marker.read_text())["fingerprint"] if marker.exists() else None
            if held != fingerprint:
                entries = sum(1 for _ in self.root.glob("iter_*/*.pkl"))
                log(f"[resume] {self.root}: {entries} recorded rollout(s) from another configuration are "
                    "discarded; in-flight prompts are generated again")
                shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            _write_atomic(marker, json.dumps({"fingerprint": fingerprint}).encode())
        for partial in self.root.glob("iter_*/*.tmp"):  # a write cut off by a kill: never an entry
            partial.unlink()

    def _path(self, key: tuple, stage: str) -> Path:
        digest = hashlib.blake2b(repr(key).encode(), digest_size=12).hexdigest()
        return self.root / f"iter_{key[0]}" / f"{digest}-{stage}.pkl"

    def get(self, key: tuple, stage: str) -> tuple[bool, Any]:
        """(True, the recorded result) of this chunk's call at `stage`, or (False, None)."""
        path = self._path(key, stage)
        if not path.exists():
            return False, None
        with open(path, "rb") as f:
            held_key, value = pickle.load(f)
        if held_key != key:  # a digest collision: not this chunk's
            return False, None
        self.replayed += 1
        return True, value

    def record(self, key: tuple, stage: str, value: Any) -> None:
        path = self._path(key, stage)
        path.parent.mkdir(exist_ok=True)
        _write_atomic(path, pickle.dumps((key, value), protocol=pickle.HIGHEST_PROTOCOL))
        self.recorded += 1

    def discard(self, iteration: int) -> None:
        """Drop an iteration's entries (and any earlier ones): its iteration-end checkpoint is written."""
        for d in self.root.glob("iter_*"):
            if d.is_dir() and d.name[5:].isdigit() and int(d.name[5:]) <= iteration:
                shutil.rmtree(d)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def rollout_fingerprint(cfg) -> str:
    """A digest of what decides the pools' results: the seed, the data, the model, the engine, the judge and
    the algorithm's settings (a changed one makes a recorded rollout another run's)."""
    from omegaconf import OmegaConf

    parts = {key: OmegaConf.to_container(OmegaConf.structured(getattr(cfg, key)))
             for key in ("algorithm", "spin", "model", "data", "engine", "judge")}
    parts["seed"] = cfg.seed
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()
