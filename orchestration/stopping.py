"""Clean stops: SIGTERM, Ctrl-C and `max_time_per_run` ask the run to stop at the next safe point, where it
saves a checkpoint and exits 0. A second Ctrl-C stops at once (the last complete checkpoint stands)."""

from __future__ import annotations

import signal
import threading
import time


class StopRequested(Exception):
    """The run stopped cleanly (after saving a checkpoint)."""

    def __init__(self, reason: str, checkpoint: str = ""):
        super().__init__(reason)
        self.reason, self.checkpoint = reason, checkpoint


class Stopper:
    def __init__(self, max_seconds: float | None = None, started: float | None = None):
        start = started if started is not None else time.monotonic()
        self.deadline = start + max_seconds if max_seconds else None
        self.max_seconds = max_seconds
        self.reason: str | None = None
        self._previous: dict = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGINT (only possible on the main thread; elsewhere signals keep their default).
        Call again after ray.init, which sets its own SIGTERM handler."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.reason = f"{signal.Signals(signum).name} received"
        print(f"[run] {self.reason}: stopping at the next safe point to save a checkpoint "
              "(Ctrl-C again to stop at once)", flush=True)

    def requested(self) -> str | None:
        if self.reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = f"max_time_per_run ({self.max_seconds:.0f}s) reached"
        return self.reason
