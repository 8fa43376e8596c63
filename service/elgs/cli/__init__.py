"""Command line: ``elgs defend | calibrate | models | defenses | bench | serve | attack | data``.

One module per command group, each exposing ``add_commands(subparsers)``; this package assembles
them in help order and runs the chosen handler. Shared pieces (:class:`CommandError`, the model
options and their loading) are in :mod:`elgs.cli._common`:

- ``defend``: one image through the engine (:mod:`elgs.cli.defend`)
- ``calibrate``: attack-score thresholds on clean images (:mod:`elgs.cli.calibrate`)
- ``models list|fetch``, ``defenses``: the registries (:mod:`elgs.cli.models`)
- ``bench defenses|service``: options here, benchmarks in :mod:`elgs.bench` (:mod:`elgs.cli.bench`)
- ``serve``: the HTTP service, ``--ray`` on Ray Serve (:mod:`elgs.cli.serve`)
- ``attack train|eval`` (:mod:`elgs.cli.attack`), ``data samples`` (:mod:`elgs.cli.data`)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from elgs.cli import attack, bench, calibrate, data, defend, models, serve
from elgs.cli._common import CommandError

__all__ = ["CommandError", "build_parser", "main"]

# The command groups, in help order.
COMMAND_MODULES = (defend, calibrate, models, bench, serve, attack, data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elgs",
        description="Defend image classifiers against adversarial patches with LGS, SLGS and WLGS.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from elgs.compute import set_torch_threads, tune_allocator
        from elgs.settings import read_settings

        try:
            settings = read_settings()  # the CLI's one read of the environment; values are passed down
            tune_allocator(settings.malloc_tuning)  # first, while this is the process's only thread
            if getattr(args, "torch_in_main_thread", True):  # elgs serve sets them in its compute threads
                set_torch_threads(settings.torch_threads)
        except ValueError as error:
            raise CommandError(str(error)) from None
        return int(args.handler(args) or 0)
    except CommandError as error:
        print(f"elgs {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

