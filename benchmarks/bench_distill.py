"""Cost and accuracy of the data-free census (detection/distill.py), cold and warm-started.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_distill.py [--files A B ...] \
        [--cold-iters 300] [--warm-iters 60] [--n 32] [--res 96] [--json out.jsonl]

The files are checkpoints of one training run in step order (default: the two committed
MobileNetV2-0.35 96x96 fixtures, steps 150 and 450). For each file:

- ``cold``: distil from seeded noise for ``--cold-iters`` steps (a one-shot scan);
- ``warm``: distil from the *previous* file's distilled inputs for ``--warm-iters`` steps
  (the daemon: a new checkpoint of the same run arrives);

then run the census on the inputs and compare the never-positive channels of the BNs read
by a ReLU / ReLU6 with the truth file beside the checkpoint (``active_fraction == 0`` over
512 real held-out images): recall, precision, false deaths. Time is wall clock of
distillation + census in this process, pinned to one BLAS thread (set before numpy is
imported); memory is the tracemalloc peak of numpy allocations during the step plus the
process's peak RSS. ``--res`` distils (and runs the census) at a reduced input size.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bnexporter.detection.distill import distilled_census  # noqa: E402
from bnexporter.topology.keras_ir import open_keras_ir  # noqa: E402

KERAS = ROOT / "tests" / "fixtures" / "keras"
DEFAULT_FILES = [KERAS / "mnv2_s150.h5", KERAS / "mnv2_s450_inj.keras"]


def score(census: Any, truth_path: Path) -> dict[str, Any]:
    truth = json.loads(truth_path.read_text())
    tp = fp = fn = channels = 0
    missing = 0
    for layer in truth["layers"]:
        if layer["consumer"] not in ("relu", "relu6"):
            continue
        act = census.layers.get(layer["name"])
        if act is None:
            missing += 1
            continue
        dead = np.asarray(layer["active_fraction"]) == 0
        got = act.positive_count == 0
        tp += int((dead & got).sum())
        fp += int((~dead & got).sum())
        fn += int((dead & ~got).sum())
        channels += dead.size
    return {"channels": channels, "truth_dead": tp + fn, "found_dead": tp + fp,
            "false_deaths": fp, "missed": fn, "layers_missing": missing,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None}


def run_one(path: Path, *, init: np.ndarray | None, iters: int, n: int, lr: float,
            res: int | None, seed: int) -> tuple[dict[str, Any], np.ndarray]:
    graph, reader = open_keras_ir(str(path))
    shape = None
    if res is not None and graph.input_shape is not None and init is None:
        shape = (res, res, graph.input_shape[-1])
    try:
        tracemalloc.start()
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        dc = distilled_census(graph, reader.read_array, n=n, iters=iters, lr=lr, seed=seed,
                              init=init, input_shape=shape)
        wall = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        reader.close()
    d = dc.distilled
    row = {"file": path.name, "mode": "warm" if init is not None else "cold",
           "n": int(d.inputs.shape[0]), "input": list(d.inputs.shape[1:]), "iters": d.iterations,
           "lr": lr, "seconds": round(wall, 2), "distill_s": round(d.seconds, 2),
           "census_s": round(dc.census.seconds, 2), "peak_numpy_mb": round(peak / 2**20, 1),
           "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "loss_start": round(d.losses[0], 5), "loss": round(d.loss, 5),
           "worst_bn": round(max((m.worst for m in d.mismatch.values()), default=0.0), 3)}
    truth = path.with_name(path.name + ".truth.json")
    if truth.exists():
        row.update(score(dc.census, truth))
    return row, d.inputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", nargs="+", type=Path, default=DEFAULT_FILES)
    ap.add_argument("--cold-iters", type=int, default=300)
    ap.add_argument("--warm-iters", type=int, default=60)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--res", type=int, default=None, help="distil at RES x RES")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cold", action="store_true", help="cold-start the first file only")
    ap.add_argument("--json", type=Path, default=None, help="append rows here (JSON lines)")
    args = ap.parse_args(argv)
    prev: np.ndarray | None = None
    for i, path in enumerate(args.files):
        rows = []
        if i == 0 or not args.no_cold:
            row, cold = run_one(path, init=None, iters=args.cold_iters, n=args.n, lr=args.lr,
                                res=args.res, seed=args.seed)
            rows.append(row)
            if prev is None:
                prev_next = cold
        if prev is not None:
            row, warm = run_one(path, init=prev, iters=args.warm_iters, n=args.n, lr=args.lr,
                                res=args.res, seed=args.seed)
            rows.append(row)
            prev_next = warm
        prev = prev_next
        for row in rows:
            line = json.dumps(row)
            print(line, flush=True)
            if args.json is not None:
                with open(args.json, "a") as fh:
                    fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
