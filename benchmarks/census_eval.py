"""Census accuracy against forward-pass truth, per sample size.

The Keras fixtures' truth (``*.truth.json``) comes from 512 held-out images run by the
real framework; the census sample here is drawn from the same image generator with
another seed (unlabeled, never the truth images). Prints precision / recall of dead
channels on ReLU-fed BNs for the estimate and for census samples of 8 / 16 / 64.

    FRAMEWORK_PYTHON benchmarks/census_eval.py [FIXTURE ...]   (the image generator of
    tests/fixtures/gen_keras.py imports TensorFlow; bnexporter itself does not)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
from gen_keras import make_images

from bnexporter.scan import ScanOptions, analyse_path

DEFAULT = ["tests/fixtures/keras/mnv2_s150.h5", "tests/fixtures/keras/mnv2_s450_inj.keras",
           "tests/fixtures/keras/k2_resnet_s400.h5", "tests/fixtures/keras/k3_small.keras"]


def score(path: str, opts: ScanOptions) -> tuple[int, int, int, float]:
    with open(path + ".truth.json") as fh:
        truth = {layer["name"]: layer for layer in json.load(fh)["layers"]}
    report = analyse_path(path, opts)
    tp = fp = fn = 0
    for layer in report.bn_layers:
        tl = truth.get(layer.name)
        if tl is None or tl["consumer"] not in ("relu", "relu6"):
            continue
        really = {i for i, a in enumerate(tl["active_fraction"]) if a == 0}
        said = set(layer.dead)
        tp, fp, fn = tp + len(really & said), fp + len(said - really), fn + len(really - said)
    return tp, fp, fn, report.duration_seconds


def main(paths: list[str]) -> int:
    print(f"{'fixture':<34} {'method':<10} {'truly dead':>10} {'precision':>9} {'recall':>7} "
          f"{'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths or DEFAULT:
            size = 96 if "mnv2" in path else 32
            rows = [("estimate", ScanOptions(bn_only=True))]
            for n in (8, 16, 64):
                x, _ = make_images(np.random.default_rng(1000 + n), n, size)
                sample = os.path.join(tmp, f"s{n}_{size}.npy")
                np.save(sample, x.astype(np.float32))
                rows.append((f"census {n}", ScanOptions(bn_only=True, census=sample)))
            for name, opts in rows:
                tp, fp, fn, secs = score(path, opts)
                prec = tp / (tp + fp) if tp + fp else float("nan")
                rec = tp / (tp + fn) if tp + fn else float("nan")
                print(f"{os.path.basename(path):<34} {name:<10} {tp + fn:>10} {prec:>9.3f} "
                      f"{rec:>7.3f} {secs:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
