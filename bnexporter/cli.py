"""The ``bnexporter`` command: scan, describe, run, check-config, demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bnexporter import __version__, scan_cli
from bnexporter.daemon import commands


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["describe"]:
        # imported here: it imports the user's model code and torch, never at run time
        from bnexporter.topology.describe import main as describe_main

        return describe_main(args_list[1:])
    p = argparse.ArgumentParser(
        prog="bnexporter",
        description="Find dying BatchNorm + ReLU channels in training checkpoints.")
    p.add_argument("--version", action="version", version=f"bnexporter {__version__}")
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
        return scan_cli.run(args)
    return commands.dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
