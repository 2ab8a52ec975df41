"""``slimtorch`` command line: one sub-command per module in ``slimtorch.commands``.

Each module defines ``register(subparsers)`` which adds its parser and sets ``func(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import SlimtorchError

COMMANDS = ("run", "report", "export", "bench", "hawq")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtorch", description="Make PyTorch models small and fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"slimtorch.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"slimtorch.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SlimtorchError as e:
        print(f"slimtorch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slimtorch {args.command}: interrupted (checkpoint written if training had started)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
