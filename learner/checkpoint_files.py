"""The learner's files in a checkpoint directory, beside the Hugging Face weights every backend writes:
optimizer and schedule state (OPTIMIZER_FILE, its contents the backend's own), every rank's RNG state
(RNG_FILE) and a small JSON summary (STATE_FILE). `publish` makes the whole directory appear at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "learner_state.json"


@contextlib.contextmanager
def publish(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty directory beside `path` to write into; when the block ends it replaces `path`.
    A block that raises leaves `path` as it was and nothing beside it."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_optimizer(directory: Path, state: dict) -> None:
    torch.save(state, Path(directory) / OPTIMIZER_FILE)


def read_optimizer(path: str | os.PathLike, mmap: bool = False) -> dict:
    """`mmap`: map the file instead of reading it (a rank that keeps only its shards pages in only those)."""
    return torch.load(Path(path) / OPTIMIZER_FILE, map_location="cpu", weights_only=False, mmap=mmap)


def write_rng_states(directory: Path, rng_states: list[dict]) -> None:
    """Every rank's RNG state, in rank order."""
    torch.save(rng_states, Path(directory) / RNG_FILE)


def read_rng_state(path: str | os.PathLike, rank: int, world_size: int) -> dict:
    """Rank `rank`'s RNG state; ValueError unless the checkpoint was written by a group of `world_size`."""
    rngs = torch.load(Path(path) / RNG_FILE, map_location="cpu", weights_only=False)
    if len(rngs) != world_size:
        raise ValueError(f"{path} holds RNG states of {len(rngs)} learner ranks, this group has "
                         f"{world_size}: resume with the same cluster.learner.workers")
    return rngs[rank]


def set_rng_state(state: dict) -> None:
    """Restore torch's CPU (and, where present, CUDA) generators from an RNG state dict."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_learner_state(directory: Path, **state: Any) -> None:
    """The summary a person or tool reads without torch (step, world size, layout)."""
    with open(Path(directory) / STATE_FILE, "w") as f:
        json.dump(state, f)
