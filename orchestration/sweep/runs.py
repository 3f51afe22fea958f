"""The sweep's runs: one `python -m orchestration.main` subprocess per (algorithm, seed), resumable.

A run whose directory holds the product's completion marker is done; any other run is started with the
same command again, and the product resumes it from its newest checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..driver import COMPLETE_MARKER

LOG_NAME = "sweep.log"
TIME_NAME = "sweep_time.json"  # wall seconds the sweep spent on a run, summed over its attempts
LOCK_NAME = ".sweep.lock"  # held by a run's process for as long as it lives
ARGS_NAME = "sweep_args.json"  # the run's arguments (its command without the interpreter), from its first start
TAIL_LINES = 12
POLL_S = 0.2


@dataclass(frozen=True)
class Run:
    algorithm: str
    seed: int
    directory: Path
    command: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.algorithm} seed {self.seed}"

    @property
    def log(self) -> Path:
        return self.directory / LOG_NAME

    @property
    def marker(self) -> Path:
        return self.directory / COMPLETE_MARKER

    def complete(self) -> bool:
        return self.marker.is_file()

    @property
    def args(self) -> list[str]:
        return list(self.command[1:])  # the interpreter's path may differ between machines; the rest may not


def record_args(run: Run) -> None:
    """Write the run's arguments at its first start (check_same_args compares later sweeps with them)."""
    run.directory.mkdir(parents=True, exist_ok=True)
    if not (run.directory / ARGS_NAME).exists():
        (run.directory / ARGS_NAME).write_text(json.dumps(run.args))


class SweepConflict(ValueError):
    """A run directory holds a run made with other arguments than this sweep would give it."""


def check_same_args(runs: Sequence[Run]) -> None:
    """Refuse to resume (or count as finished) a run that was started with other arguments: a rerun with new
    overrides into the same output_dir would otherwise report the old runs' figures under the new command."""
    for r in runs:
        try:
            recorded = json.loads((r.directory / ARGS_NAME).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise SweepConflict(f"{r.directory / ARGS_NAME}: unreadable ({e}); it records the run's arguments") from None
        if recorded != r.args:
            raise SweepConflict(
                f"{r.directory} holds {r.name} started with other arguments:\n  recorded: {shlex.join(recorded)}\n"
                f"  now:      {shlex.join(r.args)}\nuse another output_dir, or rerun with the recorded overrides")


def run_dir(output_dir: Path, algorithm: str, seed: int) -> Path:
    return output_dir / algorithm / f"seed_{seed}"


def plan(algorithms: Sequence[str], seeds: Sequence[int], output_dir: Path, overrides: Sequence[str]) -> list[Run]:
    """Seed-major order: a seed's toy world is bootstrapped by its first run and found cached by the others."""
    runs = []
    for seed in seeds:
        for algorithm in algorithms:
            directory = run_dir(output_dir, algorithm, seed)
            command = (sys.executable, "-m", "orchestration.main", f"algorithm={algorithm}", f"seed={seed}",
                       f"output_dir={directory}", *overrides)
            runs.append(Run(algorithm, seed, directory, command))
    return runs


def load_finished(runs: Sequence[Run]) -> dict[tuple[str, int], dict[str, Any]]:
    """The completion markers of the finished runs (an unreadable marker counts as unfinished)."""
    out = {}
    for r in runs:
        try:
            out[(r.algorithm, r.seed)] = json.loads(r.marker.read_text())
        except (OSError, ValueError):
            continue
    return out


def wall_seconds(run: Run) -> float | None:
    try:
        return float(json.loads((run.directory / TIME_NAME).read_text())["wall_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def log_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The log's last lines as a terminal shows them (a progress bar's carriage returns keep its last state)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    shown = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return [line for line in shown if line.strip()][-lines:]


class RunBusy(RuntimeError):
    """A process from an earlier sweep (whose sweep was killed) still runs in this run's directory."""


def launch(run: Run, env: Mapping[str, str]) -> subprocess.Popen:
    """Start a run, appending its output to its log. Its own session: a terminal's Ctrl-C reaches only the
    sweep, which forwards exactly one signal (a second one would make the product stop without saving).
    The run inherits a lock on its directory, so a rerun after the sweep itself was killed cannot start a
    second process on a run that still goes on."""
    run.directory.mkdir(parents=True, exist_ok=True)
    lock = os.open(run.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise RunBusy(f"{run.directory} is still in use by a run of an earlier sweep: let it end (or end it), "
                      "then rerun the sweep") from None
    try:
        with open(run.log, "a") as log:
            log.write(f"\n==== sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(run.command)}\n")
            log.flush()
            return subprocess.Popen(list(run.command), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True,
                                    pass_fds=(lock,))
    finally:
        os.close(lock)  # the child's copy of the descriptor keeps the lock until the run ends


@dataclass
class _Child:
    proc: subprocess.Popen
    started: float
    signals_sent: int = 0


@dataclass
class Outcome:
    run: Run
    status: str  # complete | failed | stopped (exited 0 without finishing) | interrupted | busy
    exit_code: int | None
    seconds: float  # wall time of this attempt


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")  # the log follows the run as it happens
    return env


Launcher = Callable[[Run, Mapping[str, str]], subprocess.Popen]


class Executor:
    """Runs the unfinished runs, `parallel` at a time, and forwards SIGINT/SIGTERM (SIGHUP as SIGTERM) to them."""

    def __init__(self, runs: Sequence[Run], parallel: int, log: Callable[[str], None] = print,
                 launcher: Launcher | None = None):
        self.runs, self.parallel, self.log = list(runs), parallel, log
        self.launcher = launcher or launch
        self.signal: int | None = None  # the last SIGINT/SIGTERM received; no run starts after one
        self._signals = 0  # how many arrived: the handler only counts them, the loop passes them on
        self._active: dict[Run, _Child] = {}

    def execute(self) -> list[Outcome]:
        total = len(self.runs)
        done = sum(r.complete() for r in self.runs)
        pending = [r for r in self.runs if not r.complete()]
        if done:
            self.log(f"[sweep] {done} of {total} runs already complete")
        outcomes: list[Outcome] = []
        started, reported = done, 0
        main = threading.current_thread() is threading.main_thread()  # signal handlers: main thread only
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, self._forward) for s in handled} if main else {}
        env = child_env()
        try:
            while pending or self._active:
                while self.signal is None and len(self._active) < self.parallel:
                    nxt = self._next(pending)
                    if nxt is None:
                        break
                    pending.remove(nxt)
                    started += 1
                    self.log(f"[sweep] start {nxt.name} (run {started} of {total}); log {nxt.log}")
                    try:
                        record_args(nxt)
                        self._active[nxt] = _Child(self.launcher(nxt, env), time.monotonic())
                    except RunBusy as e:
                        self.log(f"[sweep] {nxt.name} not started: {e}")
                        outcomes.append(Outcome(nxt, "busy", None, 0.0))
                if self._signals != reported:
                    reported = self._signals
                    self._report_signal(reported)
                self._deliver()
                if self.signal is not None and not self._active:
                    break
                time.sleep(POLL_S)
                for run, child in list(self._active.items()):
                    if child.proc.poll() is None:
                        continue
                    del self._active[run]
                    outcome = self._finish(run, child.proc.returncode, time.monotonic() - child.started)
                    outcomes.append(outcome)
                    done += outcome.status == "complete"
                    self.log(f"[sweep] {done} of {total} runs done")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return outcomes

    def _next(self, pending: list[Run]) -> Run | None:
        """The first pending run whose seed has no run in flight: two runs of one seed at once would both
        build that seed's toy world."""
        busy = {r.seed for r in self._active}
        return next((r for r in pending if r.seed not in busy), None)

    def _forward(self, signum: int, frame) -> None:
        # A closed terminal (SIGHUP) asks for the same clean stop as SIGTERM: the product handles only those two.
        self.signal = signal.SIGTERM if signum == signal.SIGHUP else signum
        self._signals += 1

    def _deliver(self) -> None:
        """Pass each signal received so far on to every running run, once."""
        for child in self._active.values():
            while child.signals_sent < self._signals:
                child.signals_sent += 1
                try:
                    child.proc.send_signal(self.signal)
                except ProcessLookupError:
                    pass

    def _report_signal(self, count: int) -> None:
        name = signal.Signals(self.signal).name if self.signal else "signal"
        self.log(f"[sweep] {name} received: passed to {len(self._active)} running run(s); waiting for them to "
                 "save a checkpoint and exit" + (" (a second signal: they stop at once)" if count > 1 else "")
                 + ". No new run starts; rerun the same command to continue.")

    def _finish(self, run: Run, code: int, seconds: float) -> Outcome:
        _add_wall_seconds(run, seconds)
        if run.complete():
            status = "complete"
        elif self.signal is not None:
            status = "interrupted"
        else:
            status = "failed" if code != 0 else "stopped"
        self.log(f"[sweep] {run.name}: {status} in {seconds:.0f}s (exit code {code})")
        if status in ("failed", "stopped"):
            why = ("exited 0 without finishing (a clean stop, e.g. max_time_per_run): rerun to continue"
                   if status == "stopped" else f"failed with exit code {code}")
            tail = "\n".join(f"    | {line}" for line in log_tail(run.log))
            self.log(f"[sweep] {run.name} {why}; log {run.log}; its last lines:\n{tail}")
        return Outcome(run, status, code, seconds)


def _add_wall_seconds(run: Run, seconds: float) -> None:
    path = run.directory / TIME_NAME
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {"wall_seconds": 0.0, "attempts": 0}
    state = {"wall_seconds": round(float(state.get("wall_seconds", 0)) + seconds, 1),
             "attempts": int(state.get("attempts", 0)) + 1}
    path.write_text(json.dumps(state))
