"""The ``bnexporter`` command: scan, run, check-config, demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bnexporter import __version__, scan_cli
from bnexporter.daemon import commands


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bnexporter",
        description="Find dying BatchNorm + ReLU channels in training checkpoints.")
    p.add_argument("--version", action="version", version=f"bnexporter {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    scan_cli.add_arguments(sub.add_parser("scan", help="analyse checkpoint files once"))
    commands.add_subcommands(sub)
    args = p.parse_args(argv)
    if args.command == "scan":
        return scan_cli.run(args)
    return commands.dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
