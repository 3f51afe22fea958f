"""Crash points for the resume tests: `SELFREWARD_CRASH_AT=<point>:<n>` kills this process (SIGKILL, no
cleanup, like a preempted node) the n-th time it reaches <point>. Unset, a crash point costs one dict
lookup. Points: generation (a prompt chunk was just submitted), step (a learner step is running),
checkpoint (the learner's files are written, the run state not yet), boundary (an iteration's checkpoint is
written, the refit not yet done)."""

from __future__ import annotations

import os
import signal

ENV = "SELFREWARD_CRASH_AT"
_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
