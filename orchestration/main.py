"""Command line: `python -m orchestration.main [hydra overrides...]` (also the `selfreward` script).

With no arguments it runs Self-Rewarding on the toy world on a local Ray cluster.
"""

from __future__ import annotations

import sys
import textwrap

from .config import group_options, load_config, to_yaml, top_level_keys
from .data import DataError
from .errors import ConfigError, RunFailed


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(usage())
        return 0
    show = _take_cfg_flag(args)
    try:
        cfg = load_config(args)
        if show:  # Hydra's habit: look at the composed, validated configuration before a long run
            print(to_yaml(cfg), end="")
            return 0
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


def _take_cfg_flag(args: list[str]) -> bool:
    """Remove `--cfg job` (or `-c job`) from `args`; whether it was there. Another --cfg value exits with 2."""
    for flag in ("--cfg", "-c"):
        if flag in args:
            i = args.index(flag)
            value = args[i + 1] if i + 1 < len(args) else None
            if value != "job":
                print(f"error: {flag} {value or ''}: only '{flag} job' (the composed configuration) is supported",
                      file=sys.stderr)
                raise SystemExit(2)
            del args[i : i + 2]
            return True
    return False


def usage() -> str:
    groups = "\n".join(f"  {group}: {', '.join(options)}" for group, options in group_options().items())
    keys = []
    for key, inner in top_level_keys().items():
        line = f"  {key}" + (f".{{{', '.join(inner)}}}" if inner else "")
        keys.append(textwrap.fill(line, width=110, subsequent_indent="      "))
    return (f"{__doc__.strip()}\n\n"
            "usage: python -m orchestration.main [--cfg job] [group=option ...] [key=value ...]\n"
            "  --cfg job   print the composed, validated configuration and exit\n\n"
            f"Config groups (group=option):\n{groups}\n\n"
            "Keys (key=value, section.key=value; --cfg job shows every value):\n" + "\n".join(keys) + "\n\n"
            "Defaults and comments: configs/config.yaml and its groups; the README's configuration table.")


if __name__ == "__main__":
    sys.exit(main())
