"""The driver: configuration, the algorithms' loops, data flow between the pools, logging.

The Python API (the CLI is a thin layer over it):

    from orchestration import load_config, run
    result = run(load_config(["algorithm=spin", "output_dir=/tmp/spin"]))   # -> RunResult

See examples/python_driver.py.
"""

from .config import Config, from_dict, load_config, validate
from .errors import ConfigError, RunFailed


def run(cfg: Config, log=print):
    """Run (or resume) `cfg` and return a RunResult (see orchestration.driver)."""
    from .driver import run as _run

    return _run(cfg, log)


def __getattr__(name: str):
    # RunResult lives with the driver, which imports Ray: load it only when asked for.
    if name == "RunResult":
        from . import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'orchestration' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "RunFailed", "RunResult", "from_dict", "load_config", "run", "validate"]
