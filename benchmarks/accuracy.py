"""Detection accuracy against forward-pass ground truth.

For every checkpoint with a ``<file>.truth.json`` (written by the fixture
generators from >= 512 held-out images), compare the channels bnexporter calls
dead with the channels that were really never active, per BN layer whose
output feeds a ReLU / ReLU6 in the real model.

    python benchmarks/accuracy.py tests/fixtures /path/to/more/fixtures [--by-file]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bnexporter.detection.analysis import Thresholds
from bnexporter.scan import ScanOptions, analyse_path

RELU = ("relu", "relu6")


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    near_caught: int = 0  # truly dead channels flagged at least near-dead
    alive_flagged_near: int = 0
    channels: int = 0
    files: set[str] = field(default_factory=set)

    def add(self, other: Score) -> None:
        for k in ("tp", "fp", "fn", "near_caught", "alive_flagged_near", "channels"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.files |= other.files

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")


def truth_files(roots: list[str]) -> list[str]:
    out: list[str] = []
    for root in roots:
        out += glob.glob(os.path.join(root, "**", "*.truth.json"), recursive=True)
    return sorted(out)


def score_file(truth_path: str, opts: ScanOptions, dead_at: float) -> tuple[Score, str]:
    with open(truth_path) as fh:
        truth = json.load(fh)
    ckpt = truth_path[: -len(".truth.json")]
    report = analyse_path(ckpt, opts)
    score = Score(files={ckpt})
    if report.error:
        print(f"  skipped: {report.error}", file=sys.stderr)
        return score, "error"
    found = {layer.name: layer for layer in report.bn_layers}
    layers = truth["layers"]
    items = layers.items() if isinstance(layers, dict) else ((x["name"], x) for x in layers)
    for name, t in items:
        if t.get("consumer") not in RELU:
            continue
        layer = found.get(name)
        if layer is None:
            print(f"  {ckpt}: BN layer {name} not found by bnexporter", file=sys.stderr)
            continue
        dead_truth = {i for i, f in enumerate(t["active_fraction"]) if f <= dead_at}
        dead_pred = set(layer.dead)
        near_pred = set(layer.near_dead)
        score.tp += len(dead_truth & dead_pred)
        score.fp += len(dead_pred - dead_truth)
        score.fn += len(dead_truth - dead_pred)
        score.near_caught += len(dead_truth & (dead_pred | near_pred))
        score.alive_flagged_near += len(near_pred - dead_truth)
        score.channels += layer.channels
    return score, str(truth.get("stage") or truth.get("step") or "")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("roots", nargs="+")
    ap.add_argument("--dead-p", type=float, default=Thresholds.dead_p)
    ap.add_argument("--near-dead-p", type=float, default=Thresholds.near_dead_p)
    ap.add_argument("--dead-at", type=float, default=0.0,
                    help="true activity at or below this counts as dead (default 0)")
    ap.add_argument("--by-file", action="store_true")
    ap.add_argument("--no-refine", action="store_true", help="plain Gaussian estimate only")
    args = ap.parse_args()
    th = replace(Thresholds(), dead_p=args.dead_p, near_dead_p=args.near_dead_p,
                 refine=not args.no_refine)
    opts = ScanOptions(thresholds=th, bn_only=True)
    groups: dict[str, Score] = defaultdict(Score)
    total = Score()
    for path in truth_files(args.roots):
        score, _ = score_file(path, opts, args.dead_at)
        group = os.path.relpath(os.path.dirname(path))
        groups[group].add(score)
        total.add(score)
        if args.by_file:
            print(f"{os.path.relpath(path)[:-11]:<70} P {score.precision:5.3f} "
                  f"R {score.recall:5.3f} tp {score.tp} fp {score.fp} fn {score.fn}")
    print(f"{'group':<50} {'files':>5} {'dead':>6} {'prec':>6} {'recall':>6} "
          f"{'near+dead recall':>16} {'alive near':>10}")
    for name, s in [*sorted(groups.items()), ("ALL", total)]:
        n_dead = s.tp + s.fn
        near_recall = s.near_caught / n_dead if n_dead else float("nan")
        print(f"{name:<50} {len(s.files):>5} {n_dead:>6} {s.precision:6.3f} {s.recall:6.3f} "
              f"{near_recall:16.3f} {s.alive_flagged_near:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
