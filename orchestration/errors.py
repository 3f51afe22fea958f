"""The run's failures as the user sees them: a configuration problem (exit 2) or a run that stopped (exit 1)
with where it resumes from. Everything foreseeable that goes wrong in the pools is a PoolFailed, which the
driver turns into one RunFailed message."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, with the key that caused it in the message."""


class RunFailed(RuntimeError):
    """A failure stopped the run; the message says what happened and where it can resume from."""


class PoolFailed(RuntimeError):
    """A generator, judge or learner pool could not do its part (the run stops with a checkpoint)."""


class ReplicaFailed(PoolFailed):
    """An engine replica failed more often than cluster.max_restarts allows, or could not be brought back."""


class LearnerFailed(PoolFailed):
    """A learner worker died or stopped answering."""


class RefitFailed(PoolFailed):
    """A weight refit could not give every replica the new version."""


class WrongWeightVersion(PoolFailed):
    """An output came from weights other than the ones the iteration runs on."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """One line for a message: a remote (Ray) error's last line (its type and message, without the
    traceback), a local error's first line."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    remote = type(error).__module__.startswith("ray.")
    return (lines[-1] if remote else lines[0]).strip()[:limit]
