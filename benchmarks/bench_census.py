"""Census cost per checkpoint: MobileNetV2-0.35 at 96x96 and ResNet-50 at 224x224, with 16
and 64 inputs, one BLAS thread and all cores, each in a fresh process (peak RSS included).

    python benchmarks/bench_census.py MNV2.keras RESNET50.keras

Make the two files once where Keras is installed, e.g.
``keras.applications.MobileNetV2(alpha=0.35, weights=None, input_shape=(96, 96, 3)).save(...)``
and ``keras.applications.ResNet50(weights=None).save(...)``; bnexporter itself needs neither.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import json, resource, sys, time
from bnexporter.detection.census import run_census
from bnexporter.detection.measured import graph_for
from bnexporter.formats import open_reader
import numpy as np
path, sample, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open_reader(path) as reader:
    graph = graph_for(reader)
    x = np.load(sample)
    t0 = time.perf_counter()
    res = run_census(graph, reader.read_array, x, batch=batch)
    dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "bns": len(res.layers), "skipped": len(res.skipped),
                  "rss_mb": rss}))
"""


def run(path: str, sample: str, threads: str) -> dict[str, float]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads,
               MKL_NUM_THREADS=threads)
    out = subprocess.run([sys.executable, "-c", CHILD, path, sample, "16"], env=env,
                         capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(paths: list[str]) -> int:
    load = os.getloadavg()[0]
    print(f"load average at start {load:.2f}, cores {os.cpu_count()}")
    print(f"{'model':<22} {'inputs':>6} {'threads':>7} {'seconds':>8} {'s/input':>8} "
          f"{'BNs':>4} {'peak MB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            size = 224 if "resnet" in os.path.basename(path).lower() else 96
            for n in (16, 64):
                sample = os.path.join(tmp, f"x{n}_{size}.npy")
                x = np.random.default_rng(n).uniform(-1, 1, (n, size, size, 3))
                np.save(sample, x.astype(np.float32))
                for threads in ("1", str(os.cpu_count() or 1)):
                    r = run(path, sample, threads)
                    print(f"{os.path.basename(path):<22} {n:>6} {threads:>7} "
                          f"{r['seconds']:>8.2f} {r['seconds'] / n:>8.3f} {r['bns']:>4} "
                          f"{r['rss_mb']:>8.0f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
