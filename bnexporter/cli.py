"""The ``bnexporter`` command: scan, describe, run, check-config, demo.

Exit status of every subcommand: 0 success; 64 (``EX_USAGE``) a wrong flag or value on
the command line, one line on stderr; ``scan``: 1 findings under ``--fail-on``, 2 a file
could not be read; ``run`` / ``check-config``: 2 the configuration is invalid.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from bnexporter import scan_cli
from bnexporter.buildinfo import version_text

EXIT_USAGE = scan_cli.EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (``prog: error: ... (try --help)``), exit 64."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (try {self.prog} --help)\n")


class _Version(argparse.Action):
    """node_exporter's multi-line --version (argparse's own action rewraps the lines)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(version_text())
        parser.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["describe"]:
        # imported here: it imports the user's model code and torch, never at run time
        from bnexporter.topology.describe import main as describe_main

        return describe_main(args_list[1:])
    if args_list[:1] == ["scan"]:
        # the scan's own parser, as the subcommand's: the daemon's commands (logging,
        # sockets, the web app's modules) are not imported for a one-off scan
        return scan_cli.main(args_list[1:])
    from bnexporter.daemon import commands

    p = Parser(prog="bnexporter",
               description="Find dying BatchNorm + ReLU channels in training checkpoints.")
    p.add_argument("--version", action=_Version, nargs=0,
                   help="print the version, revision and Python version, and exit")
    sub = p.add_subparsers(dest="command", required=True)
    scan_cli.add_arguments(sub.add_parser("scan", help="analyse checkpoint files once"))
    describe = sub.add_parser(
        "describe", add_help=False,
        help="write a model's graph once (needs torch): MODULE:FACTORY -o DIR/"
        "bnexporter-graph.json")
    describe.add_argument("rest", nargs=argparse.REMAINDER)
    commands.add_subcommands(sub)
    args = p.parse_args(args_list)
    if args.command == "scan":
        return scan_cli.main_guarded(args)
    return commands.dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
