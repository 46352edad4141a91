"""``bnexporter scan``: analyse checkpoint files once and print a report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace

from bnexporter.detection.analysis import Thresholds
from bnexporter.report import CLASS_NAMES, CheckpointReport
from bnexporter.scan import ScanOptions, analyse_path
from bnexporter.topology.consumers import PRESETS, ConsumerRules

EXIT_OK, EXIT_FOUND, EXIT_UNREADABLE = 0, 1, 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint files")
    p.add_argument("--json", action="store_true", help='print {"checkpoints": [...]} as JSON')
    p.add_argument("--bn-only", action="store_true",
                   help="analyse BatchNorm layers only, skip the full tensor scan")
    p.add_argument("--fail-on", action="append", choices=("dead", "nonfinite"), default=[],
                   help="exit 1 when dead channels / non-finite values are found (repeatable)")
    p.add_argument("--step-regex", help="regex on the file name; group 'step' or group 1")
    p.add_argument("--eps", type=float, help="BN epsilon when the file has no config")
    p.add_argument("--consumer", action="append", default=[], metavar="PATTERN=KIND",
                   help="what consumes matching BN layers, e.g. '*.bn2=add' (repeatable)")
    p.add_argument("--preset", action="append", default=[],
                   choices=["auto", "none", *sorted(PRESETS)],
                   help="consumer preset for state_dicts (default: auto)")
    p.add_argument("--dead-p", type=float, default=Thresholds.dead_p,
                   help="p_active below this is dead (default %(default)s)")
    p.add_argument("--near-dead-p", type=float, default=Thresholds.near_dead_p,
                   help="p_active below this is near-dead (default %(default)s)")
    p.add_argument("--extreme", type=float, default=Thresholds.extreme,
                   help="|w| above T or below 1/T is extreme (default %(default)s)")
    p.add_argument("--no-refine", action="store_true",
                   help="plain Gaussian estimate only: skip reading producer kernels "
                        "(faster, misses more channels early in training)")
    p.add_argument("--top", type=int, default=10, help="worst layers to list (default 10)")


def options_from_args(args: argparse.Namespace) -> ScanOptions:
    rules = []
    for item in args.consumer:
        pattern, sep, kind = item.rpartition("=")
        if not sep:
            raise SystemExit(f"bnexporter: --consumer {item!r}: expected PATTERN=KIND")
        rules.append((pattern, kind))
    presets = [p for p in args.preset if p != "none"] if args.preset else ["auto"]
    try:
        consumers = ConsumerRules(rules=rules, presets=presets)
    except ValueError as exc:
        raise SystemExit(f"bnexporter: {exc}") from None
    th = replace(Thresholds(), dead_p=args.dead_p, near_dead_p=args.near_dead_p,
                 extreme=args.extreme, refine=not args.no_refine)
    return ScanOptions(thresholds=th, consumers=consumers, bn_only=args.bn_only,
                       step_regex=args.step_regex, eps=args.eps)


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    reports = []
    tty = sys.stderr.isatty()
    for path in args.paths:
        progress = _progress_printer(path) if tty else None
        report = analyse_path(path, opts, progress)
        if tty:
            sys.stderr.write("\r\033[K")
        if report.error:
            print(f"bnexporter: {report.error}", file=sys.stderr)
        reports.append(report)
        if not args.json:
            print(format_text(report, args.top))
    if args.json:
        json.dump({"checkpoints": [r.to_json() for r in reports]}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    if any(r.error for r in reports):
        return EXIT_UNREADABLE
    if "dead" in args.fail_on and any(r.summary.dead for r in reports):
        return EXIT_FOUND
    if "nonfinite" in args.fail_on and any(r.summary.nonfinite for r in reports):
        return EXIT_FOUND
    return EXIT_OK


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
    p = argparse.ArgumentParser(prog="bnexporter scan")
    add_arguments(p)
    return run(p.parse_args(argv))
