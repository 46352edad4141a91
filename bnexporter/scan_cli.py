"""``bnexporter scan``: analyse checkpoint files once and print a report.

Exit status: 0 analysed; 1 findings under ``--fail-on``; 2 a file could not be read
(wins over 1); 64 a usage error (one line on stderr); 141 stdout was closed early
(``| head``: quiet, as if killed by SIGPIPE); 130 interrupted. Every flag is checked by
the rules of the configuration file (``daemon/validate.py``), so ``--dead-p 2`` fails
here exactly as ``thresholds: {dead_p: 2}`` fails there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn

from bnexporter.daemon.config import LAYER_DETAILS, ConfigError, MetricOptions
from bnexporter.daemon.validate import analysis_from_flags
from bnexporter.detection.analysis import Thresholds
from bnexporter.errors import CheckpointError
from bnexporter.formats.base import Reader
from bnexporter.report import CLASS_NAMES, CheckpointReport
from bnexporter.scan import ScanOptions, analyse_path
from bnexporter.topology.consumers import PRESETS

if TYPE_CHECKING:
    from bnexporter.detection.prune import PrunePlan

EXIT_OK, EXIT_FOUND, EXIT_UNREADABLE = 0, 1, 2
EXIT_USAGE = 64          # sysexits.h EX_USAGE
EXIT_INTERRUPTED = 130   # 128 + SIGINT
EXIT_PIPE = 141          # 128 + SIGPIPE
FORMATS = ("text", "json", "prometheus")
# config location -> the flag that sets it (errors name the flag)
FLAGS = {"step_regex": "--step-regex", "eps": "--eps", "thresholds.dead_p": "--dead-p",
         "thresholds.near_dead_p": "--near-dead-p", "thresholds.extreme": "--extreme",
         "thresholds": "--dead-p", "consumers.rules": "--consumer",
         "consumers.presets": "--preset"}


class UsageError(Exception):
    """A wrong flag value: one line on stderr, exit 64."""


class UsageParser(argparse.ArgumentParser):
    """Usage errors as one line (``prog: error: ... (try prog --help)``), exit 64."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (try {self.prog} --help)\n")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="checkpoint files, folders (SavedModel) or TF checkpoint prefixes")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="text (default), json (the schema in README) or prometheus (text "
                   "exposition: node_exporter textfile collector, Pushgateway)")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("--textfile", metavar="DIR",
                   help="also write DIR/bnexporter_<model>.prom for node_exporter's textfile "
                   "collector (atomically: write, then rename)")
    p.add_argument("--model", metavar="NAME",
                   help="model label of --format prometheus / --textfile (default: the "
                   "checkpoint's folder name)")
    p.add_argument("--layers", choices=LAYER_DETAILS[1:], default="all",
                   help="per-layer series of --format prometheus / --textfile: every BN layer "
                   "(default), only layers with findings, or none")
    p.add_argument("--census", metavar="SAMPLE",
                   help="a .npy / .npz of unlabeled model inputs (N x H x W x C or N x C x H x W):"
                   " run the model over it and decide dead channels by measured activity "
                   "(default: bnexporter-census.npy beside the checkpoint, if any)")
    p.add_argument("--distill", action="store_true",
                   help="no sample: run the census over inputs distilled from the BN "
                   "statistics (slow: minutes on a CPU; verdicts labelled census:distilled)")
    p.add_argument("--census-seconds", type=float, default=None, metavar="S",
                   help="time budget of one census (default 60; with --distill 600: a "
                   "one-shot distillation from noise takes its 300 steps)")
    p.add_argument("--bn-only", action="store_true",
                   help="analyse BatchNorm layers only, skip the full tensor scan")
    p.add_argument("--fail-on", action="append", choices=("dead", "nonfinite"), default=[],
                   help="exit 1 when dead channels / non-finite values are found (repeatable)")
    p.add_argument("--step-regex", help="regex on the file name; group 'step' or group 1")
    p.add_argument("--eps", type=float, help="BN epsilon when the file has no config (> 0)")
    p.add_argument("--consumer", action="append", default=[], metavar="PATTERN=KIND",
                   help="what consumes matching BN layers, e.g. '*.bn2=add' (repeatable)")
    p.add_argument("--preset", action="append", default=[],
                   choices=["auto", "none", *sorted(PRESETS)],
                   help="consumer preset for state_dicts (default: auto)")
    p.add_argument("--dead-p", type=float, metavar="P",
                   help=f"p_active below this is dead (0 < P < 1, default {Thresholds.dead_p})")
    p.add_argument("--near-dead-p", type=float, metavar="P",
                   help="p_active below this is near-dead (dead-p <= P < 1, default "
                   f"{Thresholds.near_dead_p})")
    p.add_argument("--extreme", type=float, metavar="T",
                   help=f"|w| above T or below 1/T is extreme (default {Thresholds.extreme})")
    p.add_argument("--no-refine", action="store_true",
                   help="plain Gaussian estimate only: skip reading producer kernels "
                        "(faster, misses more channels early in training)")
    p.add_argument("--top", type=_count, default=10, help="worst layers to list (default 10)")
    p.add_argument("--html", metavar="FILE", help="also write one self-contained HTML page "
                   "(checkpoints of one model in a series give the heatmap over time)")
    p.add_argument("--prune-plan", action="store_true", help="print the removable channels "
                   "per layer as JSON instead of the report (--json includes it anyway)")


def options_from_args(args: argparse.Namespace) -> ScanOptions:
    """Flags -> ScanOptions, by the configuration file's rules; UsageError names the flag."""
    rules = {}
    for item in args.consumer:
        pattern, sep, kind = item.rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"--consumer {item!r}: expected PATTERN=KIND")
        rules[pattern] = kind
    values: dict[str, Any] = {"bn_only": bool(args.bn_only)}
    if args.step_regex is not None:
        values["step_regex"] = args.step_regex
    if args.eps is not None:
        values["eps"] = args.eps
    th = {k: v for k, v in (("dead_p", args.dead_p), ("near_dead_p", args.near_dead_p),
                            ("extreme", args.extreme)) if v is not None}
    if args.no_refine:
        th["refine"] = False
    values["thresholds"] = th
    values["consumers"] = {"rules": rules, "presets": list(args.preset or ["auto"])}
    try:
        opts = analysis_from_flags(values, FLAGS).scan_options()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    seconds = args.census_seconds
    if seconds is None:
        seconds = 600.0 if args.distill else 60.0
    if not seconds > 0:
        raise UsageError("--census-seconds: must be > 0")
    return replace(opts, census=args.census, census_seconds=seconds, distill=args.distill)


def _output_format(args: argparse.Namespace) -> str:
    if args.json and args.format not in (None, "json"):
        raise UsageError(f"--json and --format {args.format}: give one")
    if args.textfile is not None and not os.path.isdir(args.textfile):
        raise UsageError(f"--textfile {args.textfile}: not a directory")
    if args.model is not None and not args.model.strip():
        raise UsageError("--model: expected a non-empty name")
    return "json" if args.json else (args.format or "text")


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    fmt = _output_format(args)
    reports = []
    plans: list[PrunePlan | None] = []
    want_plans = fmt == "json" or bool(args.html) or args.prune_plan
    tty = sys.stderr.isatty()
    for path in args.paths:
        progress = _progress_printer(path) if tty else None
        box: list[PrunePlan] = []
        report = analyse_path(path, opts, progress,
                              _plan_into(box, opts) if want_plans else None)
        plans.append(box[0] if box and report.ok else None)
        if tty:
            sys.stderr.write("\r\033[K")
        if report.error:  # the one place an error is printed (JSON carries it too)
            print(f"bnexporter: {report.error}", file=sys.stderr, flush=True)
        reports.append(report)
        if fmt == "text" and not report.error and not args.prune_plan:
            sys.stdout.write(format_text(report, args.top) + "\n")
            sys.stdout.flush()
    if args.html:  # issue 15: a page to hand around, and what could be pruned
        from bnexporter.daemon.web import page  # only here: ~10 ms of every start

        with open(args.html, "w", encoding="utf-8") as f:
            f.write(page.html_report(reports, plans))
    if args.prune_plan and fmt != "json":
        json.dump({"checkpoints": [{"path": r.path, "step": r.step, "prune_plan":
                                    p.to_json() if p else None}
                                   for r, p in zip(reports, plans, strict=True)]},
                  sys.stdout, indent=1)
        sys.stdout.write("\n")
    if fmt == "json":
        json.dump({"checkpoints": [{**r.to_json(), "prune_plan": p.to_json() if p else None}
                                   for r, p in zip(reports, plans, strict=True)]},
                  sys.stdout, indent=1)
        sys.stdout.write("\n")
    if fmt == "prometheus" or args.textfile is not None:
        from bnexporter import textfile  # the daemon's collector: only when asked for

        names = [args.model or textfile.model_name(r.path) for r in reports]
        views = textfile.views(reports, names, MetricOptions(layers=args.layers))
        if fmt == "prometheus":
            sys.stdout.buffer.write(textfile.render(views))
        if args.textfile is not None:
            textfile.write_textfiles(args.textfile, views)
    sys.stdout.flush()
    return exit_status(reports, args.fail_on)


def _plan_into(box: list[PrunePlan], opts: ScanOptions
               ) -> Callable[[CheckpointReport, Reader], None]:
    """The prune plan, made while the analysis still has the checkpoint open (a second
    open of an HDF5 file costs as much as the BN-only scan itself)."""
    def then(report: CheckpointReport, reader: Reader) -> None:
        from bnexporter.detection import prune

        try:
            box.append(prune.from_reader(report, reader, opts.consumers, opts.eps))
        except (CheckpointError, OSError, MemoryError, RecursionError):
            box.append(prune.plan(report))
    return then


def exit_status(reports: Sequence[CheckpointReport], fail_on: Sequence[str]) -> int:
    if any(r.error for r in reports):
        return EXIT_UNREADABLE
    if "dead" in fail_on and any(r.summary.dead for r in reports):
        return EXIT_FOUND
    if "nonfinite" in fail_on and any(r.summary.nonfinite for r in reports):
        return EXIT_FOUND
    return EXIT_OK


def main_guarded(args: argparse.Namespace) -> int:
    """``run`` with one-line usage errors, and quiet on a closed pipe or Ctrl-C."""
    try:
        return run(args)
    except UsageError as exc:
        print(f"bnexporter scan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _silence_stdout() -> None:
    """Python flushes stdout again at exit: point it at /dev/null so that is quiet."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _progress_printer(path: str) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        if total > (64 << 20):
            pct = 100.0 * done / total
            sys.stderr.write(f"\r{path}: {pct:5.1f}% of {total / 2**20:.0f} MiB")
            sys.stderr.flush()
    return show


def format_text(r: CheckpointReport, top: int = 10) -> str:
    if r.error:
        return f"{r.path}\n  error: {r.error}\n"
    s = r.summary
    lines = [
        f"{r.path}",
        f"  format {r.format}, step {r.step if r.step is not None else '?'}, "
        f"{s.bn_layers} BN layers, {s.channels} channels, {r.duration_seconds * 1000:.0f} ms",
        f"  dead {s.dead} ({100 * s.dead_ratio:.1f}% of {s.relu_channels} ReLU-fed channels), "
        + ", ".join(f"{name.replace('_', ' ')} {s.counts.get(name, 0)}"
                    for name in CLASS_NAMES if name != "dead"),
        f"  consumers known or inferred for {100 * s.consumer_coverage:.0f}% of BN layers",
    ]
    if s.unknown_consumers:
        lines.append(f"  {s.unknown_consumers} BN layers have an unknown consumer: they are "
                     "not counted as dead; 'would be dead' counts what a ReLU would kill")
    worst = r.worst_layers(top)
    if worst:
        lines.append("  worst layers:")
        width = max(len(layer.name) for layer in worst)
        for layer in worst:
            lines.append(
                f"    {layer.name:<{width}}  dead {len(layer.dead):>4}/{layer.channels:<5} "
                f"near-dead {len(layer.near_dead):>4}  consumer {layer.consumer} "
                f"({layer.consumer_source})")
    bad = [t for t in r.tensors if t.nonfinite]
    if bad:
        lines.append(f"  non-finite values: {s.nonfinite} in {len(bad)} tensors")
        lines += [f"    {t.name}: {t.nonfinite} of {t.size}" for t in bad[:top]]
    extreme = [t for t in r.tensors if (t.huge or t.tiny) and not t.nonfinite]
    if extreme:
        lines.append(f"  tensors with extreme values: {len(extreme)}")
        lines += [f"    {t.name}: {t.huge} huge, {t.tiny} tiny, max |w| {t.max_abs:.3g}"
                  for t in extreme[:top]]
    dead_filters = [(t.name, t.dead_filters) for t in r.tensors if t.dead_filters]
    if dead_filters:
        lines.append("  kernels with ~zero output filters:")
        lines += [f"    {name}: filters {filters[:12]}{' ...' if len(filters) > 12 else ''}"
                  for name, filters in dead_filters[:top]]
    lines += [f"  note: {n}" for n in r.notes[:5]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = UsageParser(prog="bnexporter scan")
    add_arguments(p)
    return main_guarded(p.parse_args(argv))
