"""Drive selfreward from a Python script or notebook: build a configuration, run it, use the result.

    python examples/python_driver.py                       # the toy world, one short iteration
    python examples/python_driver.py output_dir=/tmp/sr2   # any Hydra override, as on the command line

The CLI (`python -m orchestration.main`) is a thin layer over the same two calls.
"""

from __future__ import annotations

import sys

from orchestration import RunResult, load_config, run, validate


def main(overrides: list[str]) -> RunResult:
    # 1. Compose the configuration exactly as the CLI would (configs/ + groups + overrides)...
    cfg = load_config(["algorithm=self_rewarding", "algorithm.max_iterations=1", "output_dir=outputs/driver_example",
                       *overrides])
    # 2. ...then adjust it in Python: it is a typed dataclass tree. Validate after editing by hand.
    cfg.algorithm.save_interval = 4
    cfg.logger.wandb.mode = "disabled"
    validate(cfg)

    # 3. Run. Ray is started locally (cluster.address="") or joined (cluster.address=auto / host:port).
    result = run(cfg)

    # 4. The result: the iteration table's rows, checkpoints, the metrics file.
    if result.stopped:
        print(f"stopped early ({result.stopped}); run again to continue")
        return result
    last = result.iterations[-1]
    print(f"final task accuracy: {last['task_accuracy']}")  # toy world only; None for real models
    for path in result.checkpoints:
        print(f"checkpoint (a Hugging Face model directory): {path}")
    print(f"per-step metrics: {result.metrics_file}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
