"""Runs verifiers where they can run: in this thread when it is the main thread, else (a Ray actor's call
runs in a worker thread) in one child process whose main thread holds the work, because math-verify's
timeouts are SIGALRM signals, which only a main thread receives."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Sequence

from . import verifier
from .protocol import Sample, Verdict

Work = Sequence[tuple[str, Sample]]  # (verifier name, sample)


def verify_all(work: Work) -> list[Verdict]:
    return [verifier(name).verify(sample) for name, sample in work]


class VerifierRunner:
    def __init__(self):
        self._child: ProcessPoolExecutor | None = None

    def run(self, work: Work) -> list[Verdict]:
        """A verdict per (verifier, sample), in order."""
        on_main = threading.current_thread() is threading.main_thread()
        if on_main or not any(getattr(verifier(name), "needs_main_thread", False) for name, _ in work):
            return verify_all(work)
        if self._child is None:  # spawn, not fork: a forked copy of a threaded Ray worker can deadlock
            self._child = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self._child.submit(verify_all, list(work)).result()
        except BrokenProcessPool:
            self._child = None
            raise RuntimeError("the verifier process died (out of memory?) while scoring a batch") from None

    def close(self) -> None:
        if self._child is not None:
            self._child.shutdown(cancel_futures=True)
            self._child = None
