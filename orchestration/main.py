"""Command line: `python -m orchestration.main [hydra overrides...]` (also the `selfreward` script).

With no arguments it runs Self-Rewarding on the toy world on a local Ray cluster.
"""

from __future__ import annotations

import sys

from .config import load_config
from .data import DataError
from .errors import ConfigError, RunFailed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nKeys and defaults: configs/config.yaml and its groups; see the README.")
        return 0
    try:
        cfg = load_config(args)
        from .driver import run

        run(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
