"""Command line: ``elgs defend | models | defenses | bench`` and the commands other layers add.

Each command family lives in its own module exposing ``add_commands(subparsers)``; this file only
assembles them, so the CLI reads the same registries as the API.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that contribute sub-commands, in help order.
COMMAND_MODULES = ("elgs.commands", "elgs.api.commands", "elgs.attacks.commands")


class CommandError(Exception):
    """A user error: printed as ``error: ...`` with exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elgs",
        description="Defend image classifiers against adversarial patches with LGS, SLGS and WLGS.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "torch_in_main_thread", True):  # elgs serve sets them in its compute threads
            from elgs.compute import set_torch_threads

            try:
                set_torch_threads()
            except ValueError as error:
                raise CommandError(str(error)) from None
        return int(args.handler(args) or 0)
    except CommandError as error:
        print(f"elgs {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
