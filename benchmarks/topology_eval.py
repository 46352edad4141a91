"""Topology accuracy against the true graph: per source, how many BN layers get a
known or inferred consumer, how often that consumer is right, and how many dead
claims land on BNs that feed no ReLU.

Truth files are ``<checkpoint>.graph.json`` (written by tests/fixtures/gen_topology.py
from the framework's own graph: torch.fx users, Keras inbound nodes). Run:

    python benchmarks/topology_eval.py [DIR ...]   (default tests/fixtures/topology)
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import defaultdict

from bnexporter.report import RELU_LIKE
from bnexporter.scan import ScanOptions, analyse_path

_SPLIT = {"relu": "relu", "relu6": "relu"}


def _family(kind: str) -> str:
    return _SPLIT.get(kind, "not_relu")


def evaluate(truth_path: str) -> dict[str, object]:
    with open(truth_path) as fh:
        truth = json.load(fh)
    ckpt = truth_path[: -len(".graph.json")]
    if not os.path.exists(ckpt) and not os.path.exists(ckpt + ".index"):
        ckpt = os.path.join(os.path.dirname(truth_path), os.path.basename(truth["file"]))
    report = analyse_path(ckpt, ScanOptions(bn_only=True))
    if report.error:
        return {"file": truth["file"], "error": report.error}
    by_mean = {}
    for layer in truth["layers"]:
        by_mean[layer["tensors"]["mean"]] = layer
    found = {}
    for layer in report.bn_layers:
        found[layer.name] = layer
    rows = []
    for tl in truth["layers"]:
        # match on the BN name or on the mean tensor's prefix
        cand = found.get(tl["bn"])
        if cand is None:
            for layer in report.bn_layers:
                if tl["tensors"]["mean"].startswith(layer.name) or layer.name.endswith(tl["bn"]):
                    cand = layer
                    break
        rows.append((tl, cand))
    return {"file": truth["file"], "rows": rows}


def main(dirs: list[str]) -> int:
    per_source: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # layers, right, wrong
    totals = {"layers": 0, "known": 0, "right": 0, "dead_on_non_relu": 0, "missing": 0}
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "**", "*.graph.json"), recursive=True)):
            res = evaluate(path)
            if "error" in res:
                print(f"{res['file']}: ERROR {res['error']}")
                continue
            n = known = right = wrong_dead = missing = 0
            for tl, layer in res["rows"]:  # type: ignore[union-attr]
                n += 1
                if layer is None:
                    missing += 1
                    continue
                src = layer.consumer_source.split(":")[0] if layer.consumer != "unknown" \
                    else "none"
                stats = per_source[src]
                stats[0] += 1
                if tl["consumer"] in ("concat", "pool", "other") and layer.consumer != "unknown":
                    # the truth names only the next op; what follows it is not recorded
                    known += 1
                    right += 1
                    stats[1] += 1
                elif layer.consumer != "unknown":
                    known += 1
                    ok = _family(layer.consumer) == _family(tl["consumer"])
                    right += ok
                    stats[1 if ok else 2] += 1
                    if not ok:
                        print(f"    wrong: {layer.name}: {layer.consumer} "
                              f"({layer.consumer_source}), truth {tl['consumer']}")
                if tl["consumer"] not in RELU_LIKE and layer.dead:
                    wrong_dead += len(layer.dead)
            totals["layers"] += n
            totals["known"] += known
            totals["right"] += right
            totals["dead_on_non_relu"] += wrong_dead
            totals["missing"] += missing
            print(f"{res['file']}: {n} BN layers, consumer known/inferred {known}, right "
                  f"{right}, dead claims on non-ReLU BNs {wrong_dead}, unmatched {missing}")
    t = totals
    print()
    print(f"all: {t['layers']} BN layers; known or inferred {t['known']} "
          f"({100 * t['known'] / max(t['layers'], 1):.1f} %); right {t['right']} "
          f"({100 * t['right'] / max(t['known'], 1):.1f} % of known); dead claims on BNs "
          f"feeding no ReLU: {t['dead_on_non_relu']}; unmatched {t['missing']}")
    for src, (layers, ok, bad) in sorted(per_source.items()):
        print(f"  source {src:<10} {layers:>5} layers, right {ok}, wrong {bad}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["tests/fixtures/topology"]))
