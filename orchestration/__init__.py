"""The driver: configuration, the algorithms' loops, data flow between the pools, logging."""

from .config import Config, ConfigError, from_dict, load_config


def run(cfg: Config, log=print):
    """Run `cfg` to completion and return a RunResult (see orchestration.driver)."""
    from .driver import run as _run

    return _run(cfg, log)


__all__ = ["Config", "ConfigError", "from_dict", "load_config", "run"]
